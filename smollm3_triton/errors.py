"""The error types a user of the runtime can catch.

Every refusal of bad input raises one of these with a message that names the
file, key, tensor or argument and what was expected versus found.
"""


class SmolLMError(Exception):
    """Base class of every error this package raises on purpose."""


class GGUFError(SmolLMError, ValueError):
    """A GGUF file is malformed, truncated, or holds something we do not support."""


class ModelFormatError(SmolLMError, ValueError):
    """A model folder, config.json or safetensors file is missing or contradicts itself."""


class UnsupportedModelError(SmolLMError, ValueError):
    """An architecture or tensor type outside what this runtime runs."""


class RequestError(SmolLMError, ValueError):
    """A generation request is out of range (prompt too long, bad temperature, ...)."""


class SourceNotFoundError(SmolLMError, FileNotFoundError):
    """A model source (path, hub repo, quant file inside a repo) cannot be found."""


class KernelInputError(SmolLMError, ValueError):
    """A compute kernel got tensors whose shapes, dtypes or devices do not fit together."""
