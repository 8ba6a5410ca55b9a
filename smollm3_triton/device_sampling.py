"""Sampling on the model's device, with no host read per token, so it can run inside
the CUDA graph of a decode step.

The draw is the exponential race: token = argmax_i p_i / E_i with E_i ~ Exp(1)
independent, which picks i with probability p_i / sum(p) (the Gumbel-max trick in
linear space). Filtered-out tokens have p_i = 0 and are never picked, and p need
not be normalised.

The noise is a counter-based hash of (seed, step, token id) computed with int64
tensor ops, not a stateful generator: a replayed graph reads the step counter from
device memory and advances it itself, the same seed gives the same tokens on any
device and under any capture, and the CPU tests run exactly the code the GPU runs.

The filters mirror `generation.sampling_probs` (temperature, top-k, top-p, min-p, in
that order) and `apply_repetition_penalty`, without data-dependent shapes or host
reads: the penalty reads a [B, vocab] mask of seen tokens kept on the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .generation import SamplingParams

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


def token_hashes(token_key: int, vocab_size: int, device) -> torch.Tensor:
    """Per-request hash of each token id [vocab] (int64); one pass at request start."""
    return mix32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ token_key)


def step_keys(counter: torch.Tensor, step_key: int | torch.Tensor) -> torch.Tensor:
    """Hash of each draw's step counter [B] -> [B, 1]."""
    return mix32(counter.reshape(-1, 1) ^ step_key)


def exponential_noise(hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1) [B, vocab] float32 from token hashes [vocab] and step keys [B, 1]."""
    bits = mix32(hashes ^ keys) >> (32 - _U_BITS)
    u = (bits.to(torch.float32) + 0.5) * 2.0 ** -_U_BITS
    return -torch.log(u)


@dataclass(frozen=True)
class SamplerSpec:
    """Which stages a draw runs: the static part of a captured sampler. The values
    (temperature, top_p, min_p, penalty) live in device tensors, so one capture serves
    every request with the same spec; top_k is a size and so part of the spec."""
    greedy: bool
    top_k: int = 0            # 0: off
    top_p: bool = False
    min_p: bool = False
    penalty: bool = False

    @classmethod
    def of(cls, params: SamplingParams, vocab_size: int) -> SamplerSpec:
        greedy = params.temperature == 0
        return cls(greedy=greedy,
                   top_k=0 if greedy or params.top_k >= vocab_size else params.top_k,
                   top_p=not greedy and params.top_p < 1.0,
                   min_p=not greedy and params.min_p > 0,
                   penalty=params.repetition_penalty != 1.0)


@dataclass
class SamplerValues:
    """The numbers of a request as device tensors of shape [1, 1] (broadcast over rows)."""
    temperature: torch.Tensor     # float64, as sampling_probs divides
    top_p: torch.Tensor
    min_p: torch.Tensor
    penalty: torch.Tensor

    @classmethod
    def allocate(cls, device) -> SamplerValues:
        def one(dtype):
            return torch.ones((1, 1), dtype=dtype, device=device)
        return cls(one(torch.float64), one(torch.float32), one(torch.float32), one(torch.float32))

    def set(self, params: SamplingParams) -> None:
        """Write a request's numbers in place (fill_ launches a kernel; the host waits on nothing)."""
        self.temperature.fill_(params.temperature if params.temperature > 0 else 1.0)
        self.top_p.fill_(params.top_p)
        self.min_p.fill_(params.min_p)
        self.penalty.fill_(params.repetition_penalty)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """apply_repetition_penalty with the history as a mask: seen logits divided by the
    penalty when positive, multiplied when not."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filtered_probs(logits: torch.Tensor, spec: SamplerSpec, values: SamplerValues) -> torch.Tensor:
    """Unnormalised probabilities [B, vocab] of sampling_probs' distribution (zero where filtered)."""
    z = ((logits.double() - logits.amax(-1, keepdim=True)) / values.temperature).float()
    if spec.top_k:
        kth = z.topk(spec.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))    # ties with the k-th survive, as in sampling_probs
    probs = z.softmax(-1)
    if spec.top_p:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p     # mass ranked above each token
        drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, before >= values.top_p)
        probs = probs.masked_fill(drop, 0.0)
    if spec.min_p:
        probs = probs.masked_fill(probs < values.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs


def draw(logits: torch.Tensor, spec: SamplerSpec, values: SamplerValues, seen: torch.Tensor | None,
         hashes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, vocab] float32.

    seen: [B, vocab] bool (tokens the penalty applies to), read only when spec.penalty.
    hashes, keys: the noise's inputs (token_hashes, step_keys), unused when greedy.
    """
    if spec.penalty:
        logits = penalize(logits, seen, values.penalty)
    if spec.greedy:
        return logits.argmax(-1)
    return (filtered_probs(logits, spec, values) / exponential_noise(hashes, keys)).argmax(-1)


class DeviceSampler:
    """One stream of draws with its state in device tensors, for batch 1.

    `reset` starts a request (host work, once); `sample_` is the per-token function a
    CUDA graph captures: it reads `logits` [1, vocab], writes the token into `token`
    [1], marks it seen and advances the step counter, all on the device.
    """

    def __init__(self, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.values = SamplerValues.allocate(device)
        self.hashes = torch.zeros(vocab_size, dtype=torch.int64, device=device)
        self.step_key = torch.zeros((1, 1), dtype=torch.int64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.seen = torch.zeros((1, vocab_size), dtype=torch.bool, device=device)
        self.token = torch.zeros(1, dtype=torch.int64, device=device)
        self.spec = SamplerSpec(greedy=True)

    def reset(self, params: SamplingParams, history: list[int]) -> SamplerSpec:
        """Start a request: its spec, values, keys (params.seed, else a fresh seed) and the
        seen mask from the prompt's token ids."""
        self.spec = SamplerSpec.of(params, self.vocab_size)
        self.values.set(params)
        seed = params.seed if params.seed is not None else random_seed()
        token_key, step_key = seed_keys(seed)
        if not self.spec.greedy:
            self.hashes.copy_(token_hashes(token_key, self.vocab_size, self.device))
        self.step_key.fill_(step_key)
        self.counter.zero_()
        self.seen.zero_()
        if self.spec.penalty and history:
            ids = torch.tensor(history, dtype=torch.int64).to(self.device, non_blocking=True)
            self.seen[0].index_fill_(0, ids, True)
        return self.spec

    def sample_(self, logits: torch.Tensor) -> None:
        """One draw from logits [1, vocab] into self.token, on the device only."""
        token = draw(logits, self.spec, self.values, self.seen, self.hashes,
                     step_keys(self.counter, self.step_key))
        self.token.copy_(token)
        if self.spec.penalty:
            self.seen[0].index_fill_(0, token, True)
        self.counter.add_(1)
