"""Device sampling (smollm3_triton.device_sampling) against the CPU reference in
smollm3_triton.generation: the same filtered distribution as sampling_probs, the
same greedy token as sample(), draws whose frequencies follow that distribution,
and the same tokens for the same seed.

The oracle for the filters is sampling_probs, itself checked against transformers'
logits warpers in test_sampling.py. Tolerances: filtered probabilities rtol 1e-5
(the same float32 ops in a different order of masking); frequency tests use a
chi-square test at p >= 1e-3 with fixed seeds, so they are deterministic.
"""
import math

import pytest
import torch
from scipy import stats

from smollm3_triton.device_sampling import (MASK32, DeviceSampler, SamplerSpec, SamplerValues, draw,
                                            exponential_noise, filtered_probs, mix32, seed_keys, step_keys,
                                            token_hashes)
from smollm3_triton.generation import SamplingParams, sample, sampling_probs

PARAMS = [
    dict(temperature=1.0), dict(temperature=0.7), dict(temperature=0.8, top_k=40), dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.6, top_p=0.95), dict(temperature=1.3, min_p=0.05), dict(temperature=0.7, top_k=20, top_p=0.8),
    dict(temperature=1.0, top_k=5, min_p=0.1), dict(temperature=0.5, top_p=0.5), dict(temperature=1e-6),
    dict(temperature=2.0, top_k=1), dict(temperature=0.9, top_k=10, top_p=0.7, min_p=0.02),
]


def values_of(params: SamplingParams) -> SamplerValues:
    values = SamplerValues.allocate("cpu")
    values.set(params)
    return values


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("kw", PARAMS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_filtered_probs_match_sampling_probs(kw):
    params = SamplingParams(**kw)
    # random logits, and logits rounded to a coarse grid so ties sit at the top-k / top-p edges
    logits = torch.cat([random_logits(6, 1000, seed=1), (random_logits(4, 1000, seed=2) * 2).round() / 2])
    ours = filtered_probs(logits, SamplerSpec.of(params, 1000), values_of(params))
    for row, got in zip(logits, ours):
        ref = sampling_probs(row, params)
        assert torch.equal(got > 0, ref > 0), "a different set of tokens survives the filters"
        torch.testing.assert_close(got / got.sum(), ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.8])
def test_greedy_equals_reference(penalty):
    vocab = 300
    logits = random_logits(64, vocab, seed=3)
    params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
    gen = torch.Generator().manual_seed(4)
    histories = [torch.randint(0, vocab, (int(n),), generator=gen) for n in torch.randint(0, 40, (64,), generator=gen)]
    seen = torch.zeros(64, vocab, dtype=torch.bool)
    for i, h in enumerate(histories):
        seen[i, h] = True
    spec = SamplerSpec.of(params, vocab)
    assert spec.greedy and spec.penalty == (penalty != 1.0)
    ours = draw(logits, spec, values_of(params), seen, None, None)
    ref = [sample(row, params, None, h) for row, h in zip(logits, histories)]
    assert ours.tolist() == ref
    if penalty != 1.0:
        assert ours.tolist() != logits.argmax(-1).tolist(), "the penalty changed no token: a weak test"


def draws(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0, seen=None) -> torch.Tensor:
    """n independent draws from one logits row: the counters 0..n-1 of one seed."""
    vocab = logits.shape[-1]
    token_key, step_key = seed_keys(seed)
    rows = logits.expand(n, vocab)
    return draw(rows, SamplerSpec.of(params, vocab), values_of(params), seen, token_hashes(token_key, vocab, "cpu"),
                step_keys(torch.arange(n), step_key))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                dict(temperature=1.2, top_k=6, min_p=0.05), dict(temperature=0.8, top_k=8, top_p=0.95)])
def test_draw_frequencies_follow_the_distribution(kw):
    params = SamplingParams(**kw)
    logits = random_logits(1, 24, seed=5, scale=1.5)[0]
    ref = sampling_probs(logits, params).double()
    n = 200_000
    counts = torch.bincount(draws(logits, params, n, seed=kw.get("top_k", 0) + 1), minlength=24).double()
    assert counts[ref == 0].sum() == 0, "a filtered-out token was drawn"
    keep = ref > 0
    assert int(keep.sum()) >= 3
    expected = ref[keep] / ref[keep].sum() * counts.sum()
    result = stats.chisquare(counts[keep].numpy(), expected.numpy())
    worst = float(((counts / n - ref).abs()).max())
    print(f"{kw}: chi-square p = {result.pvalue:.3f}, worst |freq - p| = {worst:.2e}")
    assert result.pvalue >= 1e-3


def test_penalty_shifts_draws_like_the_reference():
    """With a penalty the draw follows sampling_probs(apply_repetition_penalty(...))."""
    from smollm3_triton.generation import apply_repetition_penalty
    params = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, -0.5, -1.0])
    history = torch.tensor([0, 4])
    seen = torch.zeros(1, 6, dtype=torch.bool)
    seen[0, history] = True
    n = 100_000
    counts = torch.bincount(draws(logits, params, n, seed=9, seen=seen.expand(n, 6)), minlength=6).double()
    ref = sampling_probs(apply_repetition_penalty(logits, history, 2.0), params).double()
    result = stats.chisquare(counts.numpy(), (ref / ref.sum() * counts.sum()).numpy())
    print(f"penalty 2.0: chi-square p = {result.pvalue:.3f}")
    assert result.pvalue >= 1e-3


def test_noise_is_exponential_and_independent_across_steps():
    token_key, step_key = seed_keys(123)
    hashes = token_hashes(token_key, 4096, "cpu")
    e = exponential_noise(hashes, step_keys(torch.arange(256), step_key))      # [256, 4096]
    flat = e.flatten().double()
    assert torch.isfinite(flat).all() and flat.min() > 0
    ks = stats.kstest(flat[::7].numpy(), "expon")
    print(f"noise: mean {flat.mean():.4f}, KS p = {ks.pvalue:.3f}")
    assert abs(float(flat.mean()) - 1) < 0.01 and ks.pvalue >= 1e-3
    # consecutive steps and neighbouring tokens are uncorrelated
    u = torch.exp(-e.double())
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:])):
        corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(corr) < 0.01, corr


def test_noise_extremes_stay_finite():
    # hash outputs 0 and 2**32 - 1 give u = 2**-24 and 1 - 2**-24: E must be finite and > 0
    zero_key = torch.zeros(1, 1, dtype=torch.int64)
    for extreme in (0, MASK32):
        e = exponential_noise(torch.tensor([_unmix32(extreme)]), zero_key)
        assert torch.isfinite(e).all() and float(e) > 0, (extreme, float(e))
    assert mix32(_unmix32(12345)) == 12345


def _unmix32(y: int) -> int:
    """Inverse of mix32 (so the test can reach its extreme outputs)."""
    inv = pow(0x45D9F3B, -1, 2**32)

    def unshift(x):               # inverse of x ^ (x >> 16) on 32 bits
        return x ^ (x >> 16)

    y = unshift(y)
    y = (y * inv) & MASK32
    y = unshift(y)
    y = (y * inv) & MASK32
    return unshift(y)


def test_mix32_on_tensors_equals_python_ints():
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF, 123456789]
    values += torch.randint(0, 2**32, (200,), generator=torch.Generator().manual_seed(6)).tolist()
    assert mix32(torch.tensor(values, dtype=torch.int64)).tolist() == [mix32(v) for v in values]
    assert len(set(mix32(v) for v in range(1 << 16))) == 1 << 16        # a bijection: no collisions
    # seeds that differ only above bit 32 (or only below) get different keys
    assert len({seed_keys(s) for s in (0, 1, 1 << 32, (1 << 32) + 1, 2**63 - 1)}) == 5


def test_same_seed_same_tokens_different_seed_different_tokens():
    vocab = 500
    logits = random_logits(40, vocab, seed=7, scale=1.0)

    def run(seed, **kw):
        params = SamplingParams(temperature=1.0, seed=seed, **kw)
        sampler = DeviceSampler(vocab, "cpu")
        sampler.reset(params, [1, 2, 3])
        out = []
        for row in logits:
            sampler.sample_(row[None])
            out.append(int(sampler.token))
        assert int(sampler.counter) == len(logits)
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert run(5, top_p=0.9, repetition_penalty=1.2) == run(5, top_p=0.9, repetition_penalty=1.2)
    # the draw depends on (seed, step, token), not on which filters ran: an inactive top-k
    # (k >= vocab) or top-p of 1 gives the very same tokens as none
    assert run(5, top_k=vocab) == run(5) == run(5, top_p=1.0)


def test_sampler_marks_drawn_tokens_seen():
    vocab = 50
    sampler = DeviceSampler(vocab, "cpu")
    sampler.reset(SamplingParams(temperature=0.0, repetition_penalty=1.5), [3, 3, 9])
    assert sampler.seen[0].nonzero().flatten().tolist() == [3, 9]
    logits = torch.zeros(1, vocab)
    logits[0, 20] = 5.0
    sampler.sample_(logits)
    assert int(sampler.token) == 20 and bool(sampler.seen[0, 20])
    # a request without a penalty keeps no history (nothing to read)
    sampler.reset(SamplingParams(temperature=0.0), [3])
    assert not sampler.seen.any()


def test_spec_of_params():
    assert SamplerSpec.of(SamplingParams(temperature=0, top_k=5, top_p=0.5), 100) == SamplerSpec(greedy=True)
    assert SamplerSpec.of(SamplingParams(temperature=1, top_k=100), 100) == SamplerSpec(greedy=False)
    spec = SamplerSpec.of(SamplingParams(temperature=1, top_k=7, top_p=0.9, min_p=0.1, repetition_penalty=1.1), 100)
    assert spec == SamplerSpec(greedy=False, top_k=7, top_p=True, min_p=True, penalty=True)
    assert math.isclose(values_of(SamplingParams(temperature=0.0)).temperature.item(), 1.0)
