"""Sampling a batch of sequences at once, each with its own parameters, on the model's device.

Every row goes through row-wise ops only (penalties, softmax, sort, cumsum over its
own vocabulary), so a sequence's draw does not depend on what else is in the batch.
The randomness is the counter-hash exponential race of device_sampling: token =
argmax p_i / E_i with E_i a hash of (seed, step, token id), so a seeded request
gives the same tokens alone, in a batch, after a preemption, on any device.

The distribution is generation.sampling_probs' (temperature, top-k, top-p, min-p,
the order of llama.cpp's chain and transformers' warpers), after the penalties:
repetition (prompt and output, llama.cpp/transformers semantics) and OpenAI's
presence / frequency (output only: logit -= presence * [count > 0] + frequency * count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .device_sampling import exponential_noise, mix32, random_seed, seed_keys
from .generation import SamplingParams


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
