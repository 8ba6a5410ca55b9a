"""One token per sequence from its logits row: the contract, the sampler's state and the torch
reference, `sample_torch` (the Triton kernel, `sample_triton`, is in kernels/sampling.py).

    z  = logits row, grammar-masked (-inf where the bitmask forbids), then penalised:
         repetition over prompt + output (divide positive logits, multiply negative ones),
         then presence / frequency over the output (z -= presence + frequency * count)
    T == 0: token = argmax z (the first index of the maximum)
    T > 0:  z' = (z - max z) / T (in float64, rounded to float32: a tiny T gives 0 and -inf)
            top-k keeps z' >= the k-th largest z' (ties survive); p = softmax over what it kept;
            top-p keeps a token when the mass of tokens with a strictly larger z' is < top_p;
            min-p keeps p >= min_p * max p;
            token = argmax over the kept of p / E, E ~ Exp(1) a hash of (seed, draw index, token id)

Per-sequence state lives in `SamplingState` rows, so a step passes no per-sequence lists:
`rows[s]` names the state row of sample s, `logits_rows[s]` its logits row. A draw writes
its token to `out[s]` and `state.last_token[row]` (the next step's input, without the
host) and advances the row's draw counter and penalty counts. `sample_torch` sorts whole
rows; it is the CPU's sampler too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KernelInputError

# ---------------------------------------------------------------- the noise
# A counter-based hash of (seed, draw index, token id), not a stateful generator: the same
# seed gives the same tokens on any device, in any batch and after a preemption.
MASK32 = 0xFFFFFFFF
# Thomas Mueller's 32-bit integer hash multiplier: below 2**27, so x * MIX_MULTIPLIER for x < 2**32
# stays below 2**59 and int64 arithmetic is exact on every device (uint32 wraps the same).
MIX_MULTIPLIER = 0x45D9F3B
# u = (k + 0.5) / 2**23 with k < 2**23: exact in float32 and strictly inside (0, 1), so
# E = -log(u) is finite and > 0 (24 bits would round the top value to 1.0).
_U_BITS = 23

CAP = 2048           # candidates the kernel resolves in registers per row (the scratch row's width)
HISTORY_MAX_COUNT = 32767    # the output count SamplingState.history holds at most
SATURATED = 2 * HISTORY_MAX_COUNT   # history codes from here on count no further


def mix32(x):
    """A bijective 32-bit hash; x is a Python int or an int64 tensor with values in [0, 2**32)."""
    if isinstance(x, torch.Tensor):
        return _mix32_inplace(x.clone())
    x = ((x >> 16) ^ x) * MIX_MULTIPLIER & MASK32
    x = ((x >> 16) ^ x) * MIX_MULTIPLIER & MASK32
    return (x >> 16) ^ x


def _mix32_inplace(x: torch.Tensor) -> torch.Tensor:
    """mix32 of an int64 tensor, written into it: the same integers without a temporary per
    operation (at [64, vocab] the allocations cost more than the arithmetic)."""
    shifted = torch.empty_like(x)
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=shifted)
        x.bitwise_xor_(shifted).mul_(MIX_MULTIPLIER).bitwise_and_(MASK32)
    torch.bitwise_right_shift(x, 16, out=shifted)
    return x.bitwise_xor_(shifted)


def exponential_noise(hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) [B, vocab] float32 from token hashes [.., vocab] and step keys [B, 1]."""
    bits = _mix32_inplace(hashes ^ keys).bitwise_right_shift_(32 - _U_BITS)
    u = bits.to(torch.float32).add_(0.5).mul_(2.0 ** -_U_BITS)
    return u.log_().neg_()


# ---------------------------------------------------------------- the state
@dataclass
class SamplingState:
    """Per-sequence sampling state in rows (one per running sequence), allocated once.
    top_k >= vocab, top_p = 1 and min_p = 0 turn a filter off."""
    temperature: torch.Tensor   # [M] float64 (0: greedy)
    top_k: torch.Tensor         # [M] int64
    top_p: torch.Tensor         # [M] float32
    min_p: torch.Tensor         # [M] float32
    penalties: torch.Tensor     # [M, 3] float32: repetition, presence, frequency
    penalized: torch.Tensor     # [M] int8: 1 when any penalty applies (history is read)
    keys: torch.Tensor          # [M, 2] int64: token key, step key (32-bit values)
    steps: torch.Tensor         # [M] int64: draws so far (the noise's counter)
    # [M, vocab] int16, read as uint16: 2 x the token's count in the output + 1 if the prompt
    # holds it; the count stops at 32,767 (HISTORY_MAX_COUNT). One 2-byte read per token and
    # pass for a penalised row (int32 counts + int8 prompt marks were 5).
    history: torch.Tensor
    masked: torch.Tensor        # [M] int8: 1 when bitmask's row applies this step
    bitmask: torch.Tensor       # [M, ceil(vocab / 32)] int32: bit t of word t // 32 set = token t allowed
    last_token: torch.Tensor    # [M] int64: the token each row drew last
    scratch: torch.Tensor       # [M, CAP] int64: the kernel's candidates

    @classmethod
    def allocate(cls, rows: int, vocab: int, device) -> SamplingState:
        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)
        return cls(temperature=zeros(rows, dtype=torch.float64), top_k=torch.full((rows,), vocab, device=device),
                   top_p=torch.ones(rows, device=device), min_p=zeros(rows, dtype=torch.float32),
                   penalties=torch.tensor([[1.0, 0.0, 0.0]], device=device).repeat(rows, 1),
                   penalized=zeros(rows, dtype=torch.int8), keys=zeros(rows, 2, dtype=torch.int64),
                   steps=zeros(rows, dtype=torch.int64), history=zeros(rows, vocab, dtype=torch.int16),
                   masked=zeros(rows, dtype=torch.int8),
                   bitmask=zeros(rows, -(-vocab // 32), dtype=torch.int32),
                   last_token=zeros(rows, dtype=torch.int64), scratch=zeros(rows, CAP, dtype=torch.int64))

    @property
    def vocab(self) -> int:
        return self.history.shape[1]


def check_inputs(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor, state: SamplingState) -> None:
    if logits.dim() != 2 or logits.shape[1] != state.vocab:
        raise KernelInputError(f"sample: logits of shape {tuple(logits.shape)}, expected [R, {state.vocab}]")
    if logits_rows.shape != rows.shape or rows.dim() != 1:
        raise KernelInputError(f"sample: logits_rows {tuple(logits_rows.shape)} and rows {tuple(rows.shape)} "
                               f"must be the same 1-d shape")


# ---------------------------------------------------------------- the reference
def allowed_tokens(state: SamplingState, rows: torch.Tensor) -> torch.Tensor:
    """[S, vocab] bool: what the grammar bitmask lets each row draw (everything when its row is not masked)."""
    vocab = state.vocab
    bits = (state.bitmask[rows].repeat_interleave(32, 1)[:, :vocab] >>
            (torch.arange(vocab, device=rows.device) % 32).to(torch.int32)) & 1
    return (state.masked[rows, None] == 0) | (bits != 0)


def penalized_logits(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor,
                     state: SamplingState) -> torch.Tensor:
    """z [S, vocab] float32: the rows' logits after the grammar mask and the penalties (only
    the masked and the penalised rows are computed: this is the CPU's sampler too)."""
    # The engine's CPU steps compute logits for exactly the sampled rows, in order: no gather
    # (an indexed copy of a 49k-wide row cost ~0.17 ms a token, measured in `smollm3 serve`).
    in_order = logits.device.type == "cpu" and logits_rows.tolist() == list(range(logits.shape[0]))
    z = logits.float() if in_order else logits[logits_rows].float()
    masked = (state.masked[rows] != 0).nonzero()[:, 0]
    pen = (state.penalized[rows] != 0).nonzero()[:, 0]
    if z is logits and (masked.numel() or pen.numel()):
        z = z.clone()             # written below; the caller's logits stay as they were
    if masked.numel():
        z[masked] = z[masked].masked_fill(~allowed_tokens(state, rows[masked]), float("-inf"))
    if pen.numel():
        r, zp = rows[pen], z[pen]
        rep, presence, frequency = (x[:, None] for x in state.penalties[r].unbind(1))
        code = state.history[r].to(torch.int32) & 0xFFFF
        counts, seen = code >> 1, code != 0
        zp = torch.where(seen, torch.where(zp > 0, zp / rep, zp * rep), zp)
        z[pen] = torch.where(counts > 0, zp - (presence + frequency * counts.float()), zp)
    return z


def draw_noise(token_ids: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """E [S, n] for token ids [S, n] (or [n]) of rows with keys [S, 2] at draw index steps [S]."""
    hashes = _mix32_inplace(token_ids ^ keys[:, :1])
    return exponential_noise(hashes, mix32(steps[:, None] ^ keys[:, 1:]))


def filtered_probs(z: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """Unnormalised probabilities [S, vocab] of what temperature, top-k, top-p and min-p keep
    of z [S, vocab], one set of parameters per row ([S, 1] each; top_k = vocab, top_p = 1,
    min_p = 0 turn a filter off). Sorting whole rows: the reference, not the kernel's way."""
    vocab = z.shape[1]
    zp = ((z.double() - z.amax(-1, keepdim=True)) / temperature).float()
    # Equal values are interchangeable below, so the sort need not be stable: the sorted
    # values, their probabilities and their running sums are the same in any order of ties.
    sorted_z, order = zp.sort(dim=-1, descending=True)
    kth = sorted_z.gather(-1, top_k.clamp(max=vocab) - 1)
    zp = zp.masked_fill(zp < kth, float("-inf"))          # ties with the k-th survive
    probs = zp.softmax(-1)
    sorted_p = probs.gather(-1, order)
    before = sorted_p.cumsum(-1) - sorted_p
    drop = (before >= top_p) & (top_p < 1)
    # A token's mass above is that of strictly larger values: the `before` of the first of its
    # run of equal values. That differs from its own `before` in outcome only where a run holds
    # both kept and dropped tokens, so only rows with such a run are corrected. Where `drop`
    # is monotone (kept, then dropped) that run is the last kept token's, and it is kept whole;
    # other rows (a float running sum may dip by an ulp) take each run's first `before`.
    tied = sorted_z[:, 1:] == sorted_z[:, :-1]
    split = (tied & (drop[:, 1:] != drop[:, :-1])).any(-1)
    if split.any():
        monotone = ~(drop[:, 1:] < drop[:, :-1]).any(-1)
        simple = (split & monotone).nonzero()[:, 0]
        if simple.numel():
            last_kept = drop[simple].int().argmax(-1, keepdim=True) - 1     # argmax: the first dropped
            drop[simple] &= sorted_z[simple] != sorted_z[simple].gather(-1, last_kept)
        other = (split & ~monotone).nonzero()[:, 0]
        if other.numel():
            position = torch.arange(vocab, device=zp.device).expand(other.numel(), vocab)
            starts = torch.where(torch.cat([torch.ones_like(tied[other, :1]), ~tied[other]], 1), position, 0)
            drop[other] = before[other].gather(-1, starts.cummax(-1).values) >= top_p[other]
    probs.masked_fill_(torch.empty_like(drop).scatter_(-1, order, drop), 0.0)
    return probs.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), 0.0)


def sample_torch(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor, state: SamplingState,
                 out: torch.Tensor) -> torch.Tensor:
    """The reference of sample_triton: out[s] = the token row rows[s] draws from logits[logits_rows[s]]."""
    check_inputs(logits, logits_rows, rows, state)
    z = penalized_logits(logits, logits_rows, rows, state)
    # numpy's argmax (the first of equal maxima, NaN first, as torch's) is ~10x faster than
    # torch's on a 49k-wide CPU row (5 against 56 us, measured)
    tokens = torch.from_numpy(z.numpy().argmax(-1)) if z.device.type == "cpu" else z.argmax(-1)
    drawn = (state.temperature[rows] > 0).nonzero()[:, 0]
    if drawn.numel():
        r = rows[drawn]
        probs = filtered_probs(z[drawn], state.temperature[r, None], state.top_k[r, None], state.top_p[r, None],
                               state.min_p[r, None])
        noise = draw_noise(torch.arange(state.vocab, device=z.device), state.keys[r], state.steps[r])
        tokens[drawn] = probs.div_(noise).argmax(-1)
    advance_rows(state, rows, tokens)
    out.copy_(tokens)
    return out


def advance_rows(state: SamplingState, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    state.steps[rows] += 1
    state.last_token[rows] = tokens
    code = state.history[rows, tokens].to(torch.int32) & 0xFFFF
    counting = (state.penalized[rows] != 0) & (code < SATURATED)
    state.history[rows, tokens] = (code + 2 * counting.to(torch.int32)).to(torch.int16)
