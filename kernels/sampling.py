"""One token per sequence from its logits row: penalties, a grammar bitmask, temperature,
top-k, top-p, min-p and a seeded draw, for a whole batch in one launch.

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
host) and advances the row's draw counter and penalty counts.

Triton (`sample_triton`): one program per sample streams its row, no sort of the vocabulary.
Pass A: the maximum (greedy answer) and a histogram of z' in bins of width 1/8 (relative to
the running maximum: a larger maximum shifts it by whole bins); from the counts alone it
bounds where the top-k, top-p and min-p thresholds can lie. Pass B: z' exactly, the softmax
sum, and the candidates above that bound (at most CAP) into a scratch row, sorted in
registers, where the thresholds and the draw are resolved exactly. A row with more
candidates (a very flat distribution, a large top-k) bisects over z''s bits instead (~66
passes: exact, slower). Unfiltered rows draw in pass B; greedy rows stop after pass A.
`sample_torch` is the reference of exactly this signature (sorting whole rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import KernelInputError

# ---------------------------------------------------------------- the noise
# A counter-based hash of (seed, draw index, token id), not a stateful generator: the same
# seed gives the same tokens on any device, in any batch and after a preemption.
MASK32 = 0xFFFFFFFF
# Thomas Mueller's 32-bit integer hash multiplier: below 2**27, so x * _MIX for x < 2**32
# stays below 2**59 and int64 arithmetic is exact on every device (uint32 wraps the same).
_MIX = 0x45D9F3B
# u = (k + 0.5) / 2**23 with k < 2**23: exact in float32 and strictly inside (0, 1), so
# E = -log(u) is finite and > 0 (24 bits would round the top value to 1.0).
_U_BITS = 23

CAP = 2048           # candidates a row may resolve in registers
HISTORY_MAX_COUNT = 32767    # the output count SamplingState.history holds at most
SATURATED = 2 * HISTORY_MAX_COUNT   # history codes from here on count no further
BLOCK_V = 1024       # vocabulary entries per tile of a pass


def mix32(x):
    """A bijective 32-bit hash; x is a Python int or an int64 tensor with values in [0, 2**32)."""
    if isinstance(x, torch.Tensor):
        return _mix32_inplace(x.clone())
    x = ((x >> 16) ^ x) * _MIX & MASK32
    x = ((x >> 16) ^ x) * _MIX & MASK32
    return (x >> 16) ^ x


def _mix32_inplace(x: torch.Tensor) -> torch.Tensor:
    """mix32 of an int64 tensor, written into it: the same integers without a temporary per
    operation (at [64, vocab] the allocations cost more than the arithmetic)."""
    shifted = torch.empty_like(x)
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=shifted)
        x.bitwise_xor_(shifted).mul_(_MIX).bitwise_and_(MASK32)
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


def _check(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor, state: SamplingState) -> None:
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
    _check(logits, logits_rows, rows, state)
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
    _advance(state, rows, tokens)
    out.copy_(tokens)
    return out


def _advance(state: SamplingState, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    state.steps[rows] += 1
    state.last_token[rows] = tokens
    code = state.history[rows, tokens].to(torch.int32) & 0xFFFF
    counting = (state.penalized[rows] != 0) & (code < SATURATED)
    state.history[rows, tokens] = (code + 2 * counting.to(torch.int32)).to(torch.int16)


# ---------------------------------------------------------------- the kernel
_W = tl.constexpr(0.125)        # histogram bin width, in units of z'
_NB = 256                       # bins: 0..253 regular, 254 underflow (z' below ~-31.5), 255 ignored (-inf)
_UNDER = tl.constexpr(254)
_IGNORE = tl.constexpr(255)
_NEG_INF = tl.constexpr(float("-inf"))
_MIX32 = tl.constexpr(_MIX)
_SATURATED = tl.constexpr(SATURATED)


@triton.jit
def _row_z(logit_row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency):
    """A tile of the row's z: grammar mask, then the penalties; -inf outside the vocabulary."""
    inside = offs < V
    z = tl.load(logit_row + offs, mask=inside, other=_NEG_INF).to(tl.float32)
    if masked:
        word = tl.load(st_bitmask + r * words + offs // 32, mask=inside, other=0)
        z = tl.where(((word >> (offs % 32)) & 1) != 0, z, _NEG_INF)
    if pen:
        code = tl.load(st_history + r * V + offs, mask=inside, other=0).to(tl.int32) & 0xFFFF
        count = code >> 1
        seen = code != 0
        z = tl.where(seen, tl.where(z > 0, z / rep, z * rep), z)
        z = tl.where(count > 0, z - (presence + frequency * count.to(tl.float32)), z)
    return tl.where(inside, z, _NEG_INF)


@triton.jit
def _scaled(z, z_max, temperature):
    """z' = (z - max) / T in float64, rounded to float32, as the reference computes it."""
    return ((z.to(tl.float64) - z_max) / temperature).to(tl.float32)


@triton.jit
def _mix32(x):
    """mix32 on uint32 (the multiply wraps: the int64 reference's product masked to 32 bits)."""
    mul = tl.full((), _MIX32, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def _noise(offs, token_key, draw_key):
    """E ~ Exp(1) per token id, as exponential_noise(mix32(id ^ token key), draw key)."""
    bits = _mix32(_mix32(offs.to(tl.uint32) ^ token_key) ^ draw_key) >> 9
    return -tl.log((bits.to(tl.float32) + 0.5) * 1.1920928955078125e-07)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _key(x):
    """An int64 key ordered as the float32 x: 0 .. 2**32 - 1."""
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    u = b & 0xFFFFFFFF
    return tl.where(b < 0, 0xFFFFFFFF - u, u + 0x80000000)


@triton.jit
def _value(key):
    """The float32 of a _key."""
    u = tl.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
    return tl.where(u >= 0x80000000, u - 0x100000000, u).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _sample_kernel(logits_ptr, stride_l, lrows_ptr, rows_ptr, out_ptr, V, words,
                   st_t, st_k, st_p, st_minp, st_pen, st_penalized, st_keys, st_steps, st_history,
                   st_masked, st_bitmask, st_last, st_scratch, scratch_stride,
                   CAP: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    s = tl.program_id(0)
    r = tl.load(rows_ptr + s).to(tl.int64)
    row = logits_ptr + tl.load(lrows_ptr + s).to(tl.int64) * stride_l
    temperature = tl.load(st_t + r)
    pen = tl.load(st_penalized + r) != 0
    masked = tl.load(st_masked + r) != 0
    rep, presence, frequency = tl.load(st_pen + 3 * r), tl.load(st_pen + 3 * r + 1), tl.load(st_pen + 3 * r + 2)
    top_k, top_p, min_p = tl.load(st_k + r), tl.load(st_p + r), tl.load(st_minp + r)
    token_key = tl.load(st_keys + 2 * r).to(tl.uint32)
    step = tl.load(st_steps + r)
    draw_key = _mix32(step.to(tl.uint32) ^ tl.load(st_keys + 2 * r + 1).to(tl.uint32))
    lanes = tl.arange(0, BLOCK)
    bins = tl.arange(0, NB)
    # bins of width W * T on z; the histogram is relative to `ref`, a lattice point >= the running maximum
    bin_z = tl.minimum(1.0 / (_W * tl.maximum(temperature, 1e-300)), 1e30).to(tl.float32)

    # ---- pass A: the maximum, its first index, the histogram
    z_max = tl.full((), _NEG_INF, tl.float32)
    greedy = tl.full((), 0, tl.int64)
    ref = tl.full((), _NEG_INF, tl.float32)
    hist = tl.zeros((NB,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        tile_max = tl.max(z, 0)
        tile_arg = tl.argmax(z, 0).to(tl.int64) + start
        greedy = tl.where(tile_max > z_max, tile_arg, greedy)
        z_max = tl.maximum(z_max, tile_max)
        grow = tile_max > ref
        shift = tl.where(grow, tl.maximum(tl.minimum(tl.ceil((tile_max - ref) * bin_z), 1e9), 0.0), 0.0)
        shift = shift.to(tl.int32)
        ref = tl.where(shift >= _UNDER, tile_max, ref + shift.to(tl.float32) / bin_z)
        moved = tl.sum(tl.where((bins < _UNDER) & (bins + shift >= _UNDER), hist, 0), 0)
        hist = tl.where((bins >= shift) & (bins < _UNDER), tl.gather(hist, tl.maximum(bins - shift, 0), 0), 0) + \
            tl.where(bins == _UNDER, tl.sum(tl.where(bins == _UNDER, hist, 0), 0) + moved, 0)
        j = tl.minimum(tl.maximum(tl.minimum((ref - z) * bin_z, 1e9), 0.0), _UNDER).to(tl.int32)
        hist += tl.histogram(tl.where(z == _NEG_INF, _IGNORE, j), NB)
    hist = tl.where(bins == _IGNORE, 0, hist)
    token = greedy

    if temperature > 0:
        # ---- bounds from the counts: bin j holds z' in [-(j+2)W, -(j-2)W)
        jf = bins.to(tl.float32)
        n_finite = tl.sum(hist, 0)
        count_to = tl.cumsum(hist, 0)
        low = tl.where(bins < _UNDER, tl.exp(-(jf + 2) * _W), 0.0)
        high = tl.where(bins < _UNDER, tl.minimum(tl.exp(-(jf - 2) * _W), 1.0),
                        tl.where(bins == _UNDER, tl.exp(-(_UNDER - 2) * _W), 0.0))
        mass_up = tl.sum(hist.to(tl.float32) * high, 0) * 1.0001
        topk_on = top_k < n_finite
        j_k = tl.min(tl.where(count_to >= top_k, bins, NB), 0)
        mass_from = tl.cumsum(hist.to(tl.float32) * low, 0)
        j_p = tl.min(tl.where(mass_from >= top_p * mass_up, bins, NB), 0) + 4    # tokens of bins >= j_p: dropped
        edge_p = tl.where((top_p < 1) & (j_p + 2 < _UNDER), -(j_p + 2).to(tl.float32) * _W, _NEG_INF)
        edge_m = tl.where(min_p > 0, tl.log(min_p) - 0.001, _NEG_INF)
        edge = tl.where(topk_on, tl.where(j_k < _UNDER, -(j_k + 2).to(tl.float32) * _W, _NEG_INF),
                        tl.maximum(edge_p, edge_m))
        # tokens >= edge sit in bins < -edge / W + 2
        last_bin = tl.minimum(tl.where(edge == _NEG_INF, _UNDER, (-edge / _W).to(tl.int32) + 2), _UNDER)
        n_bound = tl.sum(tl.where(bins <= last_bin, hist, 0), 0)
        filtered = topk_on | (top_p < 1) | (min_p > 0)
        compact = filtered & (n_bound <= CAP)

        # ---- pass B: z' exactly, the softmax sum; the unfiltered draw, or the candidates
        total = tl.full((), 0.0, tl.float32)
        best = tl.full((), -1.0, tl.float32)
        n_cand = tl.full((), 0, tl.int32)
        scratch = st_scratch + r * scratch_stride
        for start in range(0, V, BLOCK):
            offs = start + lanes
            z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
            zs = _scaled(z, z_max, temperature)
            e = tl.exp(zs)
            total += tl.sum(e, 0)
            if filtered:
                if compact:
                    take = zs >= edge
                    at = n_cand + tl.cumsum(take.to(tl.int32), 0) - 1
                    packed = (_key(zs) - 0x80000000) * 0x100000000 + (0xFFFFFFFF - offs.to(tl.int64))
                    tl.store(scratch + at, packed, mask=take & (at < CAP))
                    n_cand += tl.sum(take.to(tl.int32), 0)
            else:
                score = tl.where(offs < V, e / _noise(offs, token_key, draw_key), -1.0)
                tile_best = tl.max(score, 0)
                tile_arg = tl.argmax(score, 0).to(tl.int64) + start
                token = tl.where(tile_best > best, tile_arg, token)
                best = tl.maximum(best, tile_best)
        if compact:
            tl.debug_barrier()
            slot = tl.arange(0, CAP)
            packed = tl.load(scratch + slot, mask=slot < n_cand, other=-0x7FFFFFFFFFFFFFFF - 1)
            packed = tl.sort(packed, descending=True)
            valid = slot < n_cand
            v = _value((packed >> 32) + 0x80000000)
            ids = 0xFFFFFFFF - (packed & 0xFFFFFFFF)
            kth = tl.where(topk_on, tl.sum(tl.where(slot == top_k - 1, v, 0.0), 0), _NEG_INF)
            keep = valid & (v >= kth)
            e = tl.where(keep, tl.exp(v), 0.0)
            mass = tl.where(topk_on, tl.sum(e, 0), total)
            p = e / mass
            before = tl.cumsum(p, 0) - p
            prev = tl.gather(v, tl.maximum(slot - 1, 0), 0)
            first = tl.associative_scan(tl.where((slot == 0) | (v != prev), slot, 0), 0, _max_combine)
            keep = keep & (tl.gather(before, first, 0) < tl.where(top_p < 1, top_p, 2.0))
            p_max = tl.max(tl.where(slot == 0, p, 0.0), 0)
            keep = keep & ~(p < min_p * p_max)
            score = tl.where(keep, p / _noise(ids, token_key, draw_key), -1.0)
            token = tl.sum(tl.where(slot == tl.argmax(score, 0), ids, 0), 0)
        elif filtered:
            token = _bisect_draw(row, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                                 frequency, z_max, temperature, top_k, topk_on, top_p, min_p, token_key, draw_key,
                                 BLOCK)

    tl.store(out_ptr + s, token)
    tl.store(st_last + r, token)
    tl.store(st_steps + r, step + 1)
    if pen:
        code = tl.load(st_history + r * V + token).to(tl.int32) & 0xFFFF
        tl.store(st_history + r * V + token, tl.where(code < _SATURATED, code + 2, code).to(tl.int16))


@triton.jit
def _bisect_draw(row, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency,
                 z_max, temperature, top_k, topk_on, top_p, min_p, token_key, draw_key, BLOCK: tl.constexpr):
    """The thresholds found by bisection over z''s ordered bits (32 passes each), then the draw."""
    lanes = tl.arange(0, BLOCK)
    kth = tl.full((), 0, tl.int64)                  # the k-th largest key (0: keep every token)
    if topk_on:
        hi = tl.full((), 0x100000000, tl.int64)     # count(key >= lo) >= k > count(key >= hi)
        for _ in range(32):
            mid = (kth + hi) // 2
            n = tl.full((), 0, tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                           frequency)
                n += tl.sum((_key(_scaled(z, z_max, temperature)) >= mid).to(tl.int32), 0)
            big = n >= top_k
            kth = tl.where(big, mid, kth)
            hi = tl.where(big, hi, mid)
    mass = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        zs = _scaled(z, z_max, temperature)
        mass += tl.sum(tl.where(_key(zs) >= kth, tl.exp(zs), 0.0), 0)
    cut = kth
    if top_p < 1:
        lo = tl.maximum(kth - 1, 0)                  # mass(key > lo) >= top_p > mass(key > cut)
        cut = tl.full((), 0xFFFFFFFF, tl.int64)
        for _ in range(32):
            mid = (lo + cut) // 2
            above = tl.full((), 0.0, tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence,
                           frequency)
                zs = _scaled(z, z_max, temperature)
                k = _key(zs)
                above += tl.sum(tl.where((k > mid) & (k >= kth), tl.exp(zs) / mass, 0.0), 0)
            small = above < top_p
            cut = tl.where(small, mid, cut)
            lo = tl.where(small, lo, mid)
        cut = tl.maximum(cut, kth)
    best = tl.full((), -1.0, tl.float32)
    token = tl.full((), 0, tl.int64)
    p_max = 1.0 / mass
    for start in range(0, V, BLOCK):
        offs = start + lanes
        z = _row_z(row, offs, V, r, st_history, st_bitmask, words, pen, masked, rep, presence, frequency)
        zs = _scaled(z, z_max, temperature)
        p = tl.exp(zs) / mass
        keep = (_key(zs) >= cut) & (z != _NEG_INF) & ~(p < min_p * p_max)
        score = tl.where(keep, p / _noise(offs, token_key, draw_key), -1.0)
        tile_best = tl.max(score, 0)
        tile_arg = tl.argmax(score, 0).to(tl.int64) + start
        token = tl.where(tile_best > best, tile_arg, token)
        best = tl.maximum(best, tile_best)
    return token


def sample_triton(logits: torch.Tensor, logits_rows: torch.Tensor, rows: torch.Tensor, state: SamplingState,
                  out: torch.Tensor, *, cap: int = CAP) -> torch.Tensor:
    """out[s] = the token row rows[s] draws from logits[logits_rows[s]], in one launch (a `cap`
    below CAP sends more rows to the bisection path: for tests)."""
    _check(logits, logits_rows, rows, state)
    if logits.stride(1) != 1:
        raise KernelInputError("sample: logits rows must be contiguous")
    if cap > state.scratch.shape[1] or cap & (cap - 1):
        raise KernelInputError(f"sample: cap must be a power of two <= {state.scratch.shape[1]}, got {cap}")
    if rows.numel():
        st = state
        _sample_kernel[(rows.numel(),)](
            logits, logits.stride(0), logits_rows, rows, out, st.vocab, st.bitmask.shape[1],
            st.temperature, st.top_k, st.top_p, st.min_p, st.penalties, st.penalized, st.keys, st.steps,
            st.history, st.masked, st.bitmask, st.last_token, st.scratch, st.scratch.stride(0),
            CAP=cap, BLOCK=BLOCK_V, NB=_NB, num_warps=8)
    return out

