"""SmolLM3 / SmolLM2 inference on Triton kernels, from GGUF or safetensors.

The runtime (torch, triton, tokenizers) is imported on first use of a name that needs it,
so that `smollm3 --help` and the CLI's argument errors answer at once.
"""
from .errors import GGUFError, ModelFormatError, RequestError, SmolLMError, SourceNotFoundError, UnsupportedModelError

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {"Runtime": "runtime", "ChatResponse": "runtime", "SamplingParams": "sampling_params"}

__all__ = ["Runtime", "ChatResponse", "SamplingParams", "SmolLMError", "GGUFError", "ModelFormatError",
           "RequestError", "SourceNotFoundError", "UnsupportedModelError"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
