"""The device-side randomness of sampling (smollm3_triton.engine.sampler): the
counter-hash exponential noise that smollm3_triton.sampling races the filtered
probabilities against. Exp(1) by a KS test at p >= 1e-3 with fixed seeds (so it is
deterministic), uncorrelated across steps and tokens, finite at the hash's extremes;
mix32 on tensors equals mix32 on Python ints. The filters and the batched draw are
tested in test_sampling.py.
"""
import torch
from scipy import stats

from smollm3_triton.engine.sampler import MASK32, exponential_noise, mix32, seed_keys


def test_noise_is_exponential_and_independent_across_steps():
    token_key, step_key = seed_keys(123)
    # As sampling.sample keys them: a hash per token id, one per step counter.
    hashes = mix32(torch.arange(4096, dtype=torch.int64) ^ token_key)
    e = exponential_noise(hashes, mix32(torch.arange(256)[:, None] ^ step_key))      # [256, 4096]
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
