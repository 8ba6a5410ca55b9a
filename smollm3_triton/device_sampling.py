"""The randomness of sampling on the model's device, with no host read per draw
(smollm3_triton.sampling draws a batch with it).

The draw is the exponential race: token = argmax_i p_i / E_i with E_i ~ Exp(1)
independent, which picks i with probability p_i / sum(p) (the Gumbel-max trick in
linear space). Filtered-out tokens have p_i = 0 and are never picked, and p need
not be normalised.

The noise is a counter-based hash of (seed, step, token id) computed with int64
tensor ops, not a stateful generator: the same seed gives the same tokens on any
device, in any batch and after a preemption, and the CPU tests run exactly the code
the GPU runs.
"""
from __future__ import annotations

import os

import torch

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
