"""Sampling and the token loop: prefill the prompt, then decode one token at a time."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """What a request may set; every field is range-checked on construction."""
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        def number(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")

        def integer(name, value):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RequestError(f"{name} must be an integer, got {value!r}")

        integer("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        number("temperature", self.temperature)
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        integer("top_k", self.top_k)
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            integer("seed", self.seed)
            if not 0 <= self.seed < 2**63:
                raise RequestError(f"seed must be in [0, 2**63), got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)


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
    logits = logits.float() / params.temperature
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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           history: torch.Tensor | None = None) -> int:
    """The next token from logits [vocab]: greedy at temperature 0, else a seeded draw."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, params), 1, generator=generator))


def generate_tokens(model, prompt_ids: list[int], params: SamplingParams, eos_ids: set[int]) -> Iterator[int]:
    """Yield new token ids until EOS (yielded, so callers can see why it stopped) or max_new_tokens."""
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise RequestError("the prompt is empty: at least one token is needed")
    if n_prompt + params.max_new_tokens > model.max_seq_len:
        raise RequestError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) = "
            f"{n_prompt + params.max_new_tokens} exceeds the context of {model.max_seq_len} tokens "
            f"(raise max_seq_len at load, up to the model's {model.config.max_position_embeddings})")
    device = model.device
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())
    history = torch.tensor(prompt_ids, dtype=torch.long)
    tokens = history.to(device)
    logits = model.forward(tokens, torch.arange(n_prompt, device=device), last_only=True)[-1]
    for step in range(params.max_new_tokens):
        token = sample(logits.cpu(), params, generator, history)
        yield token
        if token in eos_ids or step == params.max_new_tokens - 1:
            return
        history = torch.cat([history, torch.tensor([token])])
        pos = n_prompt + step
        logits = model.forward(torch.tensor([token], device=device), torch.tensor([pos], device=device))[-1]
