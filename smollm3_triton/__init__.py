"""SmolLM3 / SmolLM2 inference on Triton kernels, from GGUF or safetensors."""
from .errors import GGUFError, ModelFormatError, RequestError, SmolLMError, SourceNotFoundError, UnsupportedModelError
from .runtime import ChatResponse, Runtime

__all__ = ["Runtime", "ChatResponse", "SmolLMError", "GGUFError", "ModelFormatError", "RequestError",
           "SourceNotFoundError", "UnsupportedModelError"]
