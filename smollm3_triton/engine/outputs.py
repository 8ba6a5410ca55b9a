"""What the engine hands back: each request's output per step, and its own counters."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]      # the top alternatives (token id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]              # generated this step (an end token included)
    text: str                         # decoded this step: stop strings cut, end tokens hidden
    finished: bool
    finish_reason: str | None         # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # What ended a "stop": the stop string, or a stop_token_ids entry; None for the model's end
    # token, a grammar's end, or any other reason (vLLM's stop_reason).
    stop_reason: str | int | None = None


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    num_blocks: int
    free_blocks: int
    kv_usage: float
    prefix_queries: int               # prompt tokens looked up in the prefix cache
    prefix_hits: int                  # of which served from it
    prompt_tokens: int                # prompt tokens computed (prefix hits excluded)
    generated_tokens: int
    preemptions: int
