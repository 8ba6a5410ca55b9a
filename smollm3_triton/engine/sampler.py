"""Each sequence's sampling: its parameters and seed, loaded into the rows of the kernel's
SamplingState when it starts running, and the one-row reference of the distribution.

The draw itself is kernels/sampling.py (sample_triton on a GPU; on the CPU its torch
reference sample_torch, kernels/sampling_reference.py): one call per step for the whole
batch, reading only rows. The randomness is a counter-hash exponential race: token = argmax p_i / E_i with E_i ~ Exp(1)
a hash of (seed, draw index, token id), so a seeded request gives the same tokens alone, in
a batch, after a preemption, on any device.

The distribution is sampling_probs' (the one-row reference below: temperature, top-k, top-p,
min-p, the order of llama.cpp's chain and transformers' warpers), after the penalties:
repetition (prompt and output, llama.cpp/transformers semantics) and OpenAI's
presence / frequency (output only: logit -= presence * [count > 0] + frequency * count).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..kernels.sampling import (HISTORY_MAX_COUNT, MASK32, SamplingState, exponential_noise, mix32, sample_torch,
                                sample_triton)
from ..sampling_params import SamplingParams

__all__ = ["MASK32", "mix32", "exponential_noise", "seed_keys", "random_seed", "SamplerState", "load_rows",
           "sampler_for", "sample", "logprobs", "apply_repetition_penalty", "sampling_probs"]

_GOLDEN = 0x9E3779B9


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a seed in [0, 2**63): one mixes token ids, one draw counters."""
    token_key = mix32(mix32(seed & MASK32) ^ (seed >> 32))
    return token_key, mix32(token_key ^ _GOLDEN)


def random_seed() -> int:
    """A seed for a request that gives none (os.urandom: no global generator is touched)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


@dataclass
class SamplerState:
    """A sequence's parameters and seed keys, as its state row receives them."""
    params: SamplingParams
    token_key: int
    step_key: int

    @classmethod
    def start(cls, params: SamplingParams) -> SamplerState:
        token_key, step_key = seed_keys(params.seed if params.seed is not None else random_seed())
        return cls(params, token_key, step_key)

    @property
    def penalized(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def load_rows(state: SamplingState, rows: list[int], samplers: list[SamplerState],
              histories: list[tuple[list[int], list[int]]]) -> None:
    """Rows start new sequences: their parameters, keys and draw counters (the tokens they
    have generated, for a preempted one), and for penalised ones the prompt's tokens and the
    output's counts. One copy per field for all rows."""
    vocab = state.vocab
    device = state.temperature.device
    idx = torch.tensor(rows, device=device)
    ps = [s.params for s in samplers]

    def put(field: torch.Tensor, values, dtype) -> None:
        field[idx] = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    put(state.temperature, [p.temperature for p in ps], torch.float64)
    put(state.top_k, [p.top_k if 0 < p.top_k < vocab else vocab for p in ps], torch.int64)
    put(state.top_p, [p.top_p for p in ps], torch.float32)
    put(state.min_p, [p.min_p for p in ps], torch.float32)
    put(state.penalties, [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in ps], torch.float32)
    put(state.penalized, [s.penalized for s in samplers], torch.int8)
    put(state.keys, [[s.token_key, s.step_key] for s in samplers], torch.int64)
    put(state.steps, [len(out) for _, out in histories], torch.int64)
    put(state.masked, [0] * len(rows), torch.int8)
    for row, s, (prompt, output) in zip(rows, samplers, histories):
        if s.penalized:
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)
            code = 2 * counts.clamp(max=HISTORY_MAX_COUNT)
            code[torch.tensor(prompt, dtype=torch.long)] += 1
            state.history[row] = code.to(torch.int16).to(device)


def sampler_for(device: torch.device):
    """The kernel on a GPU; on the CPU its torch reference (the interpreter would be far slower)."""
    return sample_triton if device.type == "cuda" else sample_torch


def sample(logits: torch.Tensor, states: list[SamplerState], histories: list[tuple[list[int], list[int]]]
           ) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, vocab], one sequence per row, outside the
    engine: histories[b] = (prompt ids, output ids) of row b (the penalties' tokens; the
    output's length is the draw index)."""
    B, vocab = logits.shape
    state = SamplingState.allocate(B, vocab, logits.device)
    load_rows(state, list(range(B)), states, histories)
    rows = torch.arange(B, device=logits.device)
    return sample_torch(logits, rows, rows, state, torch.empty(B, dtype=torch.int64, device=logits.device))


def logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model log-probabilities (before penalties and temperature, as vLLM reports them).
    logits [R, vocab], chosen [R] -> (chosen logprob [R], top ids [R, top], top logprobs [R, top])."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = lp.topk(top, dim=-1) if top else (lp[:, :0], chosen[:, None][:, :0])
    return lp.gather(-1, chosen[:, None])[:, 0], ids, values


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
