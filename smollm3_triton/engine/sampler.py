"""Sampling a batch of sequences at once, each with its own parameters, on the model's device.

Every row goes through row-wise ops only (penalties, softmax, sort, cumsum over its
own vocabulary), so a sequence's draw does not depend on what else is in the batch.
The randomness is a counter-hash exponential race: token = argmax p_i / E_i with
E_i ~ Exp(1) a hash of (seed, step, token id), so a seeded request gives the same
tokens alone, in a batch, after a preemption, on any device.

The distribution is sampling_probs' (the one-row reference below: temperature, top-k, top-p, min-p,
the order of llama.cpp's chain and transformers' warpers), after the penalties:
repetition (prompt and output, llama.cpp/transformers semantics) and OpenAI's
presence / frequency (output only: logit -= presence * [count > 0] + frequency * count).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams

# ---------------------------------------------------------------- the noise
# A counter-based hash of (seed, step, token id) in int64 tensor ops, not a stateful
# generator: the same seed gives the same tokens on any device, in any batch and after a
# preemption, and the CPU tests run exactly the code the GPU runs.

MASK32 = 0xFFFFFFFF
# Thomas Mueller's 32-bit integer hash multiplier: below 2**27, so x * _MIX for
# x < 2**32 stays below 2**59 and int64 arithmetic is exact on every device.
_MIX = 0x45D9F3B
_GOLDEN = 0x9E3779B9
# u = (k + 0.5) / 2**23 with k < 2**23: exact in float32 and strictly inside (0, 1),
# so E = -log(u) is finite and > 0 (24 bits would round the top value to 1.0).
_U_BITS = 23


def mix32(x):
    """A bijective 32-bit hash; x is a Python int or an int64 tensor with values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MIX & MASK32
    x = ((x >> 16) ^ x) * _MIX & MASK32
    return (x >> 16) ^ x


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a seed in [0, 2**63): one mixes token ids, one step counters."""
    token_key = mix32(mix32(seed & MASK32) ^ (seed >> 32))
    return token_key, mix32(token_key ^ _GOLDEN)


def random_seed() -> int:
    """A seed for a request that gives none (os.urandom: no global generator is touched)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def exponential_noise(hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) [B, vocab] float32 from token hashes [vocab] and step keys [B, 1]."""
    bits = mix32(hashes ^ keys) >> (32 - _U_BITS)
    u = (bits.to(torch.float32) + 0.5) * 2.0 ** -_U_BITS
    return -torch.log(u)


# ---------------------------------------------------------------- the reference, one row at a time

def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Seen tokens get their logit divided by the penalty when positive, multiplied when negative."""
    if penalty == 1.0 or history is None or not history.numel():
        return logits
    seen = history.unique()
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy draw uses: temperature, then top-k, top-p, min-p
    (the order of llama.cpp's default chain and of transformers' warpers)."""
    # Shifted so the best logit is 0, and divided in float64 (where a temperature of 1e-300
    # is not 0): a tiny temperature then gives 0 and -inf, never 0/0 or inf - inf = NaN.
    logits = ((logits.double() - logits.max()) / params.temperature).float()
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(-1) - sorted_p        # mass ranked above each token
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= params.top_p           # keep the smallest prefix reaching top_p
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


# ---------------------------------------------------------------- the batch sampler

@dataclass
class SamplerState:
    """What a sequence's draws need besides its params; `step` counts its draws."""
    params: SamplingParams
    token_key: int
    step_key: int

    @classmethod
    def start(cls, params: SamplingParams) -> SamplerState:
        token_key, step_key = seed_keys(params.seed if params.seed is not None else random_seed())
        return cls(params, token_key, step_key)


def _penalize(logits: torch.Tensor, row: int, p: SamplingParams, prompt_ids: list[int],
              output_ids: list[int]) -> None:
    device = logits.device
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(prompt_ids + output_ids, dtype=torch.long, device=device).unique()
        picked = logits[row, seen]
        logits[row, seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long, device=device).unique(return_counts=True)
        logits[row, ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)


def filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Unnormalised probabilities [B, vocab] of sampling_probs' distribution, one set of
    parameters per row ([B, 1] each; top_k = vocab, top_p = 1, min_p = 0 disable)."""
    # Shifted so the best logit is 0 and divided in float64, as sampling_probs does.
    z = ((logits.double() - logits.amax(-1, keepdim=True)) / temperature).float()
    z_sorted, order = z.sort(-1, descending=True)
    kth = z_sorted.gather(-1, top_k - 1)
    z = z.masked_fill(z < kth, float("-inf"))        # ties with the k-th survive, as in sampling_probs
    probs = z.softmax(-1)
    sorted_p = probs.gather(-1, order)
    before = sorted_p.cumsum(-1) - sorted_p          # mass ranked above each token
    drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, (before >= top_p) & (top_p < 1))
    probs = probs.masked_fill(drop, 0.0)
    return probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)


def sample(logits: torch.Tensor, states: list[SamplerState], histories: list[tuple[list[int], list[int]]]
           ) -> torch.Tensor:
    """Next tokens [B] (int64, on logits' device) from logits [B, vocab] float32.

    histories[b] = (prompt ids, output ids) of row b, for the penalties; states[b].step
    is the draw's index (the number of tokens the sequence has generated)."""
    B, vocab = logits.shape
    device = logits.device
    logits = logits.float().clone()
    for b, (st, (prompt_ids, output_ids)) in enumerate(zip(states, histories)):
        _penalize(logits, b, st.params, prompt_ids, output_ids)
    tokens = logits.argmax(-1)
    drawn = [b for b, st in enumerate(states) if st.params.temperature > 0]
    if drawn:
        ps = [states[b].params for b in drawn]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        probs = filtered_probs(
            logits[drawn],
            column([p.temperature for p in ps], torch.float64),
            column([p.top_k if 0 < p.top_k < vocab else vocab for p in ps], torch.long),
            column([p.top_p for p in ps], torch.float32),
            column([p.min_p for p in ps], torch.float32))
        token_keys = column([states[b].token_key for b in drawn], torch.int64)
        hashes = mix32(torch.arange(vocab, dtype=torch.int64, device=device)[None, :] ^ token_keys)
        steps = column([len(histories[b][1]) for b in drawn], torch.int64)
        keys = mix32(steps ^ column([states[b].step_key for b in drawn], torch.int64))
        tokens[drawn] = (probs / exponential_noise(hashes, keys)).argmax(-1)
    return tokens


def logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model log-probabilities (before penalties and temperature, as vLLM reports them).
    logits [R, vocab], chosen [R] -> (chosen logprob [R], top ids [R, top], top logprobs [R, top])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = lp.topk(top, dim=-1) if top else (lp[:, :0], chosen[:, None][:, :0])
    return lp.gather(-1, chosen[:, None])[:, 0], ids, values
