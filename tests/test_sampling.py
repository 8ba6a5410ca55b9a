"""Sampling against transformers' logits processors (the oracle for each filter) and
the draw against the distribution it should follow."""
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                     TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from smollm3_triton.generation import SamplingParams, apply_repetition_penalty, sample, sampling_probs


def hf_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    for w in warpers:
        scores = w(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (0.8, 40, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (0.6, 0, 0.95, 0.0),
    (1.3, 0, 1.0, 0.05), (0.7, 20, 0.8, 0.0), (1.0, 5, 1.0, 0.1), (0.5, 0, 0.5, 0.0)])
def test_filtered_distribution_matches_transformers(temperature, top_k, top_p, min_p):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    ours = sampling_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    ref = hf_probs(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(ours > 0, ref > 0), "a different set of tokens survives the filters"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    history = torch.tensor([3, 7, 7, 20, 49])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history[None], logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, history, 1.3), ref)


def test_draws_follow_the_distribution():
    # probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.8 keeps the first two -> 0.625 / 0.375
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_p=0.8)
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(logits, params, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.03      # ~4 standard deviations at n = 4000


def test_greedy_and_seed():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(2))
    assert sample(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1), torch.Generator().manual_seed(9)) == int(logits.argmax())
    params = SamplingParams(temperature=2.0)
    runs = [[sample(logits, params, g) for _ in range(20)] for g in
            (torch.Generator().manual_seed(5), torch.Generator().manual_seed(5), torch.Generator().manual_seed(6))]
    assert runs[0] == runs[1] and runs[0] != runs[2]
