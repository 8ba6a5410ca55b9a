"""What one server holds: its model once loaded (the model loads on a thread after the
socket opens, so /health can answer 503 meanwhile), its limits, admission and metrics."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from fastapi import Request

from ..engine.async_engine import AsyncEngine
from .errors import APIError
from .metrics import Metrics
from .pipeline import Admission

log = logging.getLogger("smollm3.server")


@dataclass
class ServerState:
    served_model_name: str
    api_key: str | None
    max_waiting: int
    max_body_bytes: int
    runtime: object = None
    engine: AsyncEngine | None = None
    admission: Admission | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)

    def __post_init__(self):
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine is not None else None)

    def load(self, load: Callable[[], object]) -> None:
        """Build the Runtime (on the loader thread); a failure is reported by every endpoint."""
        try:
            rt = load()
        except Exception as e:
            log.error("loading the model failed: %s", e)
            self.load_error = str(e)
            return
        engine = AsyncEngine(rt.engine)
        self.admission = Admission(engine.max_num_seqs + self.max_waiting)
        self.runtime, self.engine = rt, engine
        log.info("model %s ready: %s, KV cache %d tokens in %d blocks", self.served_model_name, rt.source,
                 rt.engine.kv_cache_tokens, rt.engine.num_blocks)

    def ready(self):
        """The runtime, once loaded; else 503 as llama-server answers while loading."""
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="unavailable_error")
        if self.engine is None:
            raise APIError(503, "Loading model", type="unavailable_error")
        return self.runtime

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.served_model_name}`",
                           param="model", code="model_not_found")

    async def json_body(self, request: Request) -> dict:
        """The body as a JSON object, read no further than the size limit."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body
