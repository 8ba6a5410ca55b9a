"""SmolLM3 / SmolLM2 inference on Triton kernels, from GGUF or safetensors.

The runtime (torch, triton, tokenizers) is imported on first use of a name that needs it,
so that `smollm3 --help` and the CLI's argument errors answer at once.
"""
import os

# torch's OpenMP (libgomp) spins ~300k iterations at the end of every parallel region by
# default. On cores other processes hold, the few torch ops left in a cpu-backend step
# (sampling over the vocabulary, embedding rows) then wait on a descheduled spinning thread:
# at load 7-10 on 2 cores, 2 threads decoded at 0.6x one thread's speed; with a bounded spin
# of 1000, 1.45x (bench/README.md, "CPU"). libgomp reads it once, when torch loads it: set
# before torch is imported, and never over the user's own value.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

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
