"""What a request may ask for (SamplingParams), and the limits checked before any work."""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import ContextLengthError, FieldError, RequestError

if TYPE_CHECKING:     # torch and numpy are imported where used: the CLI checks SamplingParams before torch loads
    import torch

# The most top alternatives a request may ask for per token (vLLM's default cap is 20).
MAX_LOGPROBS = 20
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputs:
    """What the output must match, enforced while decoding (vLLM's StructuredOutputsParams).

    Exactly one of:
      json: a JSON schema (a dict, or its JSON text); True: any JSON object
      regex: a regular expression the whole output matches
      choice: the output is one of these strings
      grammar: a GBNF grammar (llama.cpp's format; the start rule is `root`)
      structural_tag: xgrammar's structural tag ({"type": "structural_tag", "format": {...}})
    after: the constraint starts once the output contains this text (a reasoning model's
      "</think>": the reasoning before it stays free).
    param: the request field it came from, named in errors (each API sets its own name).
    """
    json: dict | str | bool | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: dict | str | None = None
    after: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self):
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError(self.param, f"must set exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                                         f"{', '.join(given) or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("json", "structural_tag"):
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise FieldError(self.param, f"is not valid JSON: {e}") from None
            if kind == "json" and value is True:
                value = {"type": "object"}
            if not isinstance(value, dict) or isinstance(value, bool):
                raise FieldError(self.param, f"must be a JSON object (a schema), got {type(value).__name__}")
        elif kind == "choice":
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise FieldError(self.param, f"must be a non-empty list of strings, got {value!r}"[:300])
            for i, c in enumerate(value):
                if not isinstance(c, str) or not c:
                    raise FieldError(self.param, f"must be a non-empty string, got {c!r}"[:300], where=f"[{i}]")
            value = tuple(value)
        elif not isinstance(value, str) or not value.strip():
            raise FieldError(self.param, f"must be a non-empty string, got {value!r}"[:300])
        object.__setattr__(self, kind, value)
        if self.after is not None and (not isinstance(self.after, str) or not self.after):
            raise FieldError("after", f"must be a non-empty string, got {self.after!r}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) is not None)

    @property
    def value(self):
        return getattr(self, self.kind)

    @classmethod
    def from_response_format(cls, fmt, param: str = "response_format") -> StructuredOutputs | None:
        """OpenAI's `response_format` (as llama-server and vLLM also take it): {"type": "text"}
        (None: no constraint), {"type": "json_object"} (with llama-server's optional "schema"),
        {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, or vLLM's
        {"type": "structural_tag", ...}; a pydantic model class stands for its JSON schema."""
        if isinstance(fmt, type) and hasattr(fmt, "model_json_schema"):
            return cls(json=fmt.model_json_schema(), param=param)
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise FieldError(param, f'must be an object with a "type", got {fmt!r}'[:300])
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            schema = fmt.get("schema", {"type": "object"})
            return cls(json=schema, param=f"{param}.schema" if "schema" in fmt else param)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise FieldError(f"{param}.json_schema", 'must be an object with a "schema" (and a "name")')
            return cls(json=spec["schema"], param=f"{param}.json_schema.schema")
        if kind == "structural_tag":
            return cls(structural_tag=fmt, param=param)
        raise FieldError(f"{param}.type", f"must be one of text, json_object, json_schema, structural_tag; "
                                          f"got {kind!r}"[:300])

    def key(self) -> str:
        """The grammar's identity (the compile cache's key): kind and spec, not where it came from."""
        return json.dumps([self.kind, self.value], sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class SamplingParams:
    """What a request may set; every field is range-checked on construction.

    Numbers may be any real / integral type (numpy scalars included) and are
    stored as Python floats / ints; bools are refused where a number is meant.
    """
    max_new_tokens: int = 256
    temperature: float = 0.6
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_p: float = 0.0        # 0: off
    repetition_penalty: float = 1.0   # over the prompt and the output (llama.cpp, transformers)
    presence_penalty: float = 0.0     # OpenAI's: over the output only
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)   # end tokens besides the model's
    ignore_eos: bool = False
    logprobs: int | None = None         # per new token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first
    structured_outputs: StructuredOutputs | None = None   # a grammar the output must match
    # Tokens the model may write inside its think block; then the engine writes `</think>` for it
    # (None: no cap; 0: the block closes at once). Nothing happens where no think block opens.
    thinking_budget: int | None = None

    def __post_init__(self):
        def number(name: str, check, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise FieldError(name, f"must be a finite number, got {value!r}")
            if not check(float(value)):
                raise FieldError(name, f"must be {rule}, got {value!r}")
            object.__setattr__(self, name, float(value))

        def integer(name: str, check, rule: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise FieldError(name, f"must be an integer, got {value!r}")
            if not check(int(value)):
                raise FieldError(name, f"must be {rule}, got {value!r}")
            object.__setattr__(self, name, int(value))

        integer("max_new_tokens", lambda v: v >= 1, ">= 1")
        number("temperature", lambda v: v >= 0, ">= 0 (0 is greedy)")
        integer("top_k", lambda v: v >= 0, ">= 0 (0 disables it)")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 disables it)")
        number("min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0 disables it)")
        number("repetition_penalty", lambda v: v > 0, "> 0 (1 disables it)")
        number("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)")
        number("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                integer(name, lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.ignore_eos, bool):
            raise FieldError("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, numbers.Integral)
                                                      or i < 0 for i in ids):
            raise FieldError("stop_token_ids", f"must be a list of token ids (integers >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        if self.seed is not None:
            integer("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)")
        if self.thinking_budget is not None:
            integer("thinking_budget", lambda v: v >= 0, ">= 0 (0 closes the think block at once)")
        stop = self.stop
        if stop is None or isinstance(stop, str):
            stop = () if stop is None else (stop,)
        if not isinstance(stop, (list, tuple)):
            raise FieldError("stop", f"must be a string or a list of strings, got {stop!r}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise FieldError("stop", f"must be a non-empty string, got {s!r}", where=f"[{i}]")
        object.__setattr__(self, "stop", tuple(stop))
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputs):
            if not isinstance(so, dict):
                raise FieldError("structured_outputs", f"must be a StructuredOutputs or a dict of its fields, "
                                                       f"got {type(so).__name__}")
            unknown = sorted(set(so) - {*STRUCTURED_KINDS, "after", "param"})
            if unknown:
                raise FieldError("structured_outputs", f"has unknown keys {unknown}; known: {list(STRUCTURED_KINDS)}")
            object.__setattr__(self, "structured_outputs", StructuredOutputs(**so))


# ---------------------------------------------------------------- limits, checked before any work

def check_max_seq_len(max_seq_len, config, dtype: torch.dtype, device: torch.device) -> int:
    """The context length a model is loaded with, checked before its KV cache is allocated.

    Beyond the model's max_position_embeddings is allowed with a warning, as
    llama.cpp allows n_ctx > n_ctx_train: nothing is indexed out of bounds (the
    cache and RoPE tables are sized to max_seq_len), only quality past the
    trained length is not guaranteed. What can never fit is refused: a KV cache
    larger than the device's whole memory.
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, numbers.Integral):
        raise FieldError("max_seq_len", f"must be an integer, got {max_seq_len!r}")
    max_seq_len = int(max_seq_len)
    if max_seq_len < 1:
        raise FieldError("max_seq_len", f"must be >= 1, got {max_seq_len}")
    # K and V of every layer, plus the RoPE tables (float64 angles, cos, sin while built).
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype.itemsize + 12 * config.head_dim
    total = device_memory(device)
    if max_seq_len * per_token > total:
        raise RequestError(f"max_seq_len {max_seq_len} needs {max_seq_len * per_token / 2**30:.1f} GiB for the KV "
                           f"cache alone, more than the {total / 2**30:.1f} GiB of memory of {device}")
    if max_seq_len > config.max_position_embeddings:
        warnings.warn(f"max_seq_len {max_seq_len} exceeds the {config.max_position_embeddings} positions the model "
                      f"was trained on (max_position_embeddings); output past that length may degrade",
                      stacklevel=3)
    return max_seq_len


def device_memory(device: torch.device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_token_ids(token_ids, vocab_size: int, max_seq_len: int) -> torch.Tensor:
    """token_ids (a sequence of ints, or a 1-D integer tensor / array) as a long tensor,
    every id inside the vocabulary and the whole within the context."""
    import numpy as np
    import torch

    if isinstance(token_ids, (str, bytes)):
        raise RequestError(f"token_ids must be a sequence of integers, got {type(token_ids).__name__}")
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        dtype = token_ids.dtype
        integral = (dtype.kind in "iu" if isinstance(token_ids, np.ndarray)
                    else not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool))
        if token_ids.ndim != 1 or not integral:
            raise RequestError(f"token_ids must be a 1-D integer tensor, got shape {tuple(token_ids.shape)} "
                               f"{token_ids.dtype}")
        ids = token_ids.tolist()
    else:
        try:
            ids = list(token_ids)
        except TypeError:
            raise RequestError(f"token_ids must be a sequence of integers, got {type(token_ids).__name__}") from None
        for i, v in enumerate(ids):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise RequestError(f"token_ids[{i}] must be an integer, got {v!r}")
    if not ids:
        raise RequestError("token_ids is empty: at least one token is needed")
    if len(ids) > max_seq_len:
        raise RequestError(f"token_ids has {len(ids)} tokens, more than the context of {max_seq_len} tokens")
    for i, v in enumerate(ids):
        if not 0 <= v < vocab_size:
            raise RequestError(f"token_ids[{i}] = {int(v)} is outside the vocabulary 0..{vocab_size - 1}")
    return torch.tensor([int(v) for v in ids], dtype=torch.long)


def check_request(n_prompt: int, params: SamplingParams, max_seq_len: int) -> None:
    """The context boundary: prompt + max_new_tokens <= max_seq_len, so every token of the result fits."""
    if n_prompt == 0:
        raise RequestError("the prompt is empty: it encodes to no tokens, and generation needs at least one",
                           param="prompt")
    if n_prompt + params.max_new_tokens > max_seq_len:
        raise ContextLengthError(n_prompt, params.max_new_tokens, max_seq_len)
