"""The error types a user of the runtime can catch.

Every refusal of bad input raises one of these with a message that names the
file, key, tensor or argument and what was expected versus found. A request's
errors also carry what an API layer needs as data: the argument (`param`, the
Python API's name) and a `code`, so a server answers in its own words without
reading the message.
"""
from __future__ import annotations


class SmolLMError(Exception):
    """Base class of every error this package raises on purpose."""


class GGUFError(SmolLMError, ValueError):
    """A GGUF file is malformed, truncated, or holds something we do not support."""


class ModelFormatError(SmolLMError, ValueError):
    """A model folder, config.json or safetensors file is missing or contradicts itself."""


class UnsupportedModelError(SmolLMError, ValueError):
    """An architecture or tensor type outside what this runtime runs."""


class SourceNotFoundError(SmolLMError, FileNotFoundError):
    """A model source (path, hub repo, quant file inside a repo) cannot be found."""


class KernelInputError(SmolLMError, ValueError):
    """A compute kernel got tensors whose shapes, dtypes or devices do not fit together."""


class RequestError(SmolLMError, ValueError):
    """A request or a load argument is refused (out of range, malformed, too long).

    param: the argument to blame, as the Python API names it (None: no single one).
    code: what kind of refusal, for an API's error body (None: a plain bad request)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class FieldError(RequestError):
    """One argument's value breaks its rule: `{param}{where} {rule}`, e.g.
    "temperature must be >= 0, got -1" or "stop[2] must be a non-empty string"."""

    def __init__(self, param: str, rule: str, *, where: str = ""):
        super().__init__(f"{param}{where} {rule}", param=param)
        self.rule, self.where = rule, where

    def renamed(self, param: str) -> str:
        """The message with the argument called by another name (an API's)."""
        return f"{param}{self.where} {self.rule}"


class ContextLengthError(RequestError):
    """prompt + max_new_tokens does not fit the context (or the whole KV cache)."""

    def __init__(self, n_prompt: int, max_new_tokens: int, limit: int, limit_name: str = "context"):
        self.n_prompt, self.max_new_tokens, self.limit, self.limit_name = n_prompt, max_new_tokens, limit, limit_name
        super().__init__(self.describe(), param="max_new_tokens" if self.room >= 1 else "prompt",
                         code="context_length_exceeded")

    @property
    def room(self) -> int:
        """The most new tokens that would fit after this prompt."""
        return self.limit - self.n_prompt

    def describe(self, max_tokens: str = "max_new_tokens", remedy: str = "load with a larger max_seq_len") -> str:
        """The message, with the API's name for max_new_tokens and its way to a larger context."""
        total = self.n_prompt + self.max_new_tokens
        advice = f"lower {max_tokens} to at most {self.room} or " if self.room >= 1 else "the prompt alone fills it; "
        return (f"prompt ({self.n_prompt} tokens) + {max_tokens} ({self.max_new_tokens}) = {total} tokens exceeds "
                f"the {self.limit_name} of {self.limit} tokens: {advice}{remedy}")
