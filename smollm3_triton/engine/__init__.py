"""The serving engine: many sequences decoded together on a paged KV cache."""
from .async_engine import AsyncEngine
from .engine import Engine
from .outputs import RequestOutput, TokenLogprob

__all__ = ["Engine", "AsyncEngine", "RequestOutput", "TokenLogprob"]
