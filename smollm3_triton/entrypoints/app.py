"""`smollm3 serve`: the HTTP server on the batching engine, in any API's shape.

    request -> _Guard (API key, body size, request counter by endpoint)
            -> an API's route (openai/routes.py, anthropic/routes.py): fields checked -> pipeline
               -> JSON or SSE

With an API key, /health, /metrics (a Prometheus scraper has no key) and the OpenAPI document
(/openapi.json, /docs) stay open, as vLLM's do; every API route asks for the key, as
`Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key: <key>` (Anthropic's).

`GET /` is the chat page (webui.py; `webui=False`, the CLI's --no-webui, turns it off), and
`GET /props` tells it what the loaded model takes (images, a thinking mode).

The model loads on a background thread after the socket is open, so /health answers 503
while loading, as llama-server does. Every refusal is an APIError, answered in the API's
own shape; library refusals (RequestError) are translated with the API's field names.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException

from ..errors import RequestError
from . import webui as webui_routes
from .anthropic import routes as anthropic_routes
from .anthropic.protocol import API_NAMES as ANTHROPIC_NAMES
from .errors import ANTHROPIC_PREFIX, APIError, api_error_of, error_body
from .openai import routes as openai_routes
from .openai.protocol import API_NAMES, RESPONSES_NAMES
from .openapi_doc import describe
from .state import ServerState

log = logging.getLogger("smollm3.server")

MAX_BODY_BYTES = 8 * 2**20


def create_app(load: Callable[[], object], *, served_model_name: str, api_key: str | None = None,
               max_waiting: int = 256, max_body_bytes: int = MAX_BODY_BYTES, webui: bool = True) -> FastAPI:
    """The FastAPI app; `load()` builds the Runtime on a background thread at startup.
    webui: serve the chat page at `/`."""
    state = ServerState(served_model_name, api_key, max_waiting, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, args=(load,), name="smollm3-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="smollm3-triton", version="0.1.0", lifespan=lifespan, redoc_url=None,
                  description="OpenAI-compatible (chat completions, completions, responses) and Anthropic-"
                              "compatible (messages) serving of SmolLM models on the batching engine.")
    app.state.smollm3 = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(request.url.path, exc)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error_response(request.url.path, api_error_of(exc, _names(request.url.path)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error_response(request.url.path, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(request.url.path, APIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(state.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/props")
    async def props():
        """llama-server's /props in small: what the page needs to know about the model."""
        rt = state.ready()
        return {"model": state.served_model_name, "max_model_len": rt.max_seq_len,
                "modalities": {"vision": rt.vision is not None},
                # the rule render_chat applies: a template with a thinking mode reads enable_thinking
                "thinking": "enable_thinking" in (rt.tokenizer.chat_template or "")}

    openai_routes.add_routes(app, state)
    anthropic_routes.add_routes(app, state)
    describe(app, served_model_name)
    if webui:
        webui_routes.add_routes(app)
    return app


def _names(path: str) -> dict[str, str]:
    """The library's argument names as the API at `path` calls its fields."""
    if path.startswith(ANTHROPIC_PREFIX):
        return ANTHROPIC_NAMES
    if path.startswith("/v1/responses"):
        return RESPONSES_NAMES
    return {**API_NAMES, "prompt": "prompt" if path == "/v1/completions" else "messages"}


def _error_response(path: str, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(error_body(path, exc), status_code=exc.status, headers=headers)


class _Guard:
    """Pure ASGI middleware (so `receive` reaches the handlers untouched, disconnects
    included): API key, body size by Content-Length, and the requests counter."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self._refusal(path, headers)
            if error is not None:
                await _error_response(path, error)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.requests.labels(_endpoint(path), str(status[0])).inc()

    def _refusal(self, path: str, headers: dict) -> APIError | None:
        key = self.state.api_key
        if key is not None and path not in _OPEN and not webui_routes.is_page_path(path):
            bearer = headers.get(b"authorization", b"")
            given = headers.get(b"x-api-key", bearer[7:] if bearer[:7].lower() == b"bearer " else b"")
            if not hmac.compare_digest(given, key.encode()):
                return APIError(401, "Incorrect API key provided" if given or bearer else
                                "No API key provided: send the header 'Authorization: Bearer <key>' or "
                                "'x-api-key: <key>'", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.state.max_body_bytes
            except ValueError:
                return APIError(400, "Content-Length is not a number")
            if too_big:
                return APIError(413, f"request body of {int(length)} bytes is over the limit of "
                                     f"{self.state.max_body_bytes} bytes")
        return None


_OPEN = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"}
_ENDPOINTS = {"/health", "/metrics", "/props", "/", "/v1/models", "/v1/chat/completions", "/v1/completions",
              "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize",
              "/openapi.json", "/docs"}


def _endpoint(path: str) -> str:
    """The metrics label of a path: one per route (a model's name is not a label of its own)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in _ENDPOINTS else "other"


def run_server(load: Callable[[], object], *, host: str, port: int, served_model_name: str,
               api_key: str | None, max_waiting: int, describe: str, webui: bool = True) -> int:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests finish
    (up to a grace period), then the engine aborts what is left; exit status 0."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(load, served_model_name=served_model_name, api_key=api_key, max_waiting=max_waiting,
                     webui=webui)
    log.info("smollm3 serve: %s as %r on http://%s:%d%s%s", describe, served_model_name, host, port,
             " (API key required)" if api_key else "", "" if webui else " (no chat page)")
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30,
                            access_log=False)
    # uvicorn handles the signal, shuts down gracefully, then re-raises it under the handler
    # it found: this one records it, so that a requested stop exits 0.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: received.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("stopped by %s", signal.Signals(received[-1]).name)
    return 0
