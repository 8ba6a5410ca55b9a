"""`smollm3 serve`: an OpenAI-compatible HTTP server on the batching engine.

    request -> auth, body size -> openai_protocol (fields checked) -> prompt ids
            -> AsyncEngine.generate (one per choice) -> JSON or server-sent events

Every request is raced against the client's `http.disconnect`: a client that goes away
cancels its handler, which aborts its sequences (their KV blocks are free at once).
The model loads on a background thread after the socket is open, so /health answers
503 while loading, as llama-server does.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException

from ...chat import THINK_OPEN
from ...chat_parser import CALL_OPEN, ChatTextParser, Delta, tool_calls_as_text
from ...engine.async_engine import AsyncEngine
from ...engine.outputs import RequestOutput, TokenLogprob
from ...errors import RequestError
from .protocol import APIError, api_error_of, parse_chat, parse_completion, with_max_tokens

log = logging.getLogger("smollm3.server")

MAX_BODY_BYTES = 8 * 2**20
disable_created_metrics()                 # the *_created series say nothing a scrape needs
COMPLETIONS_DEFAULT_MAX_TOKENS = 16       # the legacy API's default


# ---------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one
    process). Engine gauges are read at scrape time."""

    def __init__(self, state: "ServerState"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("smollm3:requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("smollm3:prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("smollm3:generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("smollm3:time_to_first_token_seconds", "request arrival to its first token",
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.itl = Histogram("smollm3:inter_token_latency_seconds", "time between a request's tokens",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        r.register(_EngineCollector(state))


class _EngineCollector:
    def __init__(self, state: "ServerState"):
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        s = engine.stats()
        for name, doc, value in (
                ("num_requests_running", "sequences in the running batch", s.running),
                ("num_requests_waiting", "sequences waiting for admission", s.waiting),
                ("kv_cache_usage_perc", "fraction of KV-cache blocks in use", s.kv_usage),
                ("kv_cache_blocks_total", "KV-cache blocks in the pool", s.num_blocks),
                ("kv_cache_blocks_free", "KV-cache blocks free (cached prefix blocks count as free)",
                 s.free_blocks),
                ("prefix_cache_queries", "prompt tokens looked up in the prefix cache", s.prefix_queries),
                ("prefix_cache_hits", "prompt tokens served from the prefix cache", s.prefix_hits),
                ("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries",
                 s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0),
                ("num_preemptions", "sequences preempted (recomputed later)", s.preemptions)):
            yield GaugeMetricFamily(f"smollm3:{name}", doc, value=value)


# ---------------------------------------------------------------------------- state

@dataclass
class ServerState:
    served_model_name: str
    api_key: str | None
    max_waiting: int
    max_body_bytes: int
    runtime: object = None
    engine: AsyncEngine | None = None
    load_error: str | None = None
    active: int = 0                            # sequences admitted and not finished
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self):
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="unavailable_error")
        if self.engine is None:
            raise APIError(503, "Loading model", type="unavailable_error")
        return self.runtime, self.engine


# ---------------------------------------------------------------------------- the app

def create_app(load: Callable[[], object], *, served_model_name: str, api_key: str | None = None,
               max_waiting: int = 256, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; `load()` builds the Runtime on a background thread at startup."""
    state = ServerState(served_model_name, api_key, max_waiting, max_body_bytes)
    metrics = Metrics(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=_load_into, args=(state, load, asyncio.get_running_loop()),
                                  name="smollm3-load", daemon=True)
        loader.start()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="smollm3-triton", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.smollm3 = state
    app.state.metrics = metrics
    app.add_middleware(_Guard, state=state, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        prompt_param = "prompt" if request.url.path == "/v1/completions" else "messages"
        return _error_response(api_error_of(exc, prompt_param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(APIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health():
        state.ready()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        rt, _ = state.ready()
        return {"object": "list", "data": [{"id": state.served_model_name, "object": "model",
                                            "created": state.created, "owned_by": "smollm3-triton",
                                            "max_model_len": rt.model.max_seq_len}]}

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        rt, _ = state.ready()
        body = await _json_body(request, state)
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise APIError(400, "content: must be a string (the text to tokenize)", param="content")
        ids = rt.tokenizer.encode(text)
        out = {"tokens": ids, "count": len(ids), "max_model_len": rt.model.max_seq_len}
        if body.get("with_pieces") is True:
            out["tokens"] = [{"id": i, "piece": rt.tokenizer.decode([i])} for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        rt, _ = state.ready()
        body = await _json_body(request, state)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "tokens: must be a list of token ids", param="tokens")
        bad = [i for i in ids if not 0 <= i < rt.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is outside the vocabulary 0..{rt.tokenizer.vocab_size - 1}",
                           param="tokens")
        text = rt.tokenizer.decode(ids)
        return {"content": text, "prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rt, engine = state.ready()
        req = parse_chat(await _json_body(request, state), rt.model.max_seq_len)
        _check_model(state, req.model)
        return await _serve(request, state, metrics, _ChatJob(rt, req, state.served_model_name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        rt, engine = state.ready()
        req = parse_completion(await _json_body(request, state), COMPLETIONS_DEFAULT_MAX_TOKENS)
        _check_model(state, req.model)
        return await _serve(request, state, metrics, _CompletionJob(rt, req, state.served_model_name))

    return app


def _load_into(state: ServerState, load: Callable[[], object], loop) -> None:
    try:
        rt = load()
    except Exception as e:           # reported by /health and every endpoint, never a crash
        log.error("loading the model failed: %s", e)
        state.load_error = str(e)
        return
    state.runtime = rt
    state.engine = AsyncEngine(rt.engine)
    log.info("model %s ready: %s, KV cache %d tokens in %d blocks", state.served_model_name, rt.source,
             rt.engine.kv_cache_tokens, rt.engine.pool.n_blocks)


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.served_model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{state.served_model_name}`",
                       param="model", code="model_not_found")


def _error_response(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _json_body(request: Request, state: ServerState) -> dict:
    """The body as a JSON object, read no further than the size limit."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise APIError(413, f"request body over the limit of {state.max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class _Guard:
    """Pure ASGI middleware (so `receive` reaches the handlers untouched, disconnects
    included): API key, body size by Content-Length, and the requests counter."""

    def __init__(self, app, state: ServerState, metrics: Metrics):
        self.app, self.state, self.metrics = app, state, metrics

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
                await _error_response(error)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(path if path in _ENDPOINTS else "other", str(status[0])).inc()

    def _refusal(self, path: str, headers: dict) -> APIError | None:
        key = self.state.api_key
        if key is not None and path != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {key}":
                return APIError(401, "Incorrect API key provided" if auth else "No API key provided: send "
                                "the header 'Authorization: Bearer <key>'", code="invalid_api_key")
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


_ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize",
              "/detokenize"}


# ---------------------------------------------------------------------------- generation

@dataclass
class _Choice:
    """One sequence of a request: its prompt, and what it has produced so far."""
    index: int
    prompt_ids: list[int]
    params: object
    mm_embeds: list
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0


async def _serve(request: Request, state: ServerState, metrics: Metrics, job) -> Response:
    """Admit the job's choices, then answer as JSON or as an event stream; either way
    raced against the client's disconnect."""
    rt, engine = job.rt, state.engine          # the handler found both ready
    # Off the event loop: rendering, tokenizing and above all encoding images (SmolVLM) is model work.
    choices = await asyncio.to_thread(job.choices)
    if state.active + len(choices) > rt.engine.scheduler.max_num_seqs + state.max_waiting:
        raise APIError(503, f"the server is at capacity ({state.active} sequences in flight, "
                            f"{state.max_waiting} may wait): retry later", type="unavailable_error",
                       code="queue_full")
    arrived = time.perf_counter()
    streams, ids = [], []
    try:
        for c in choices:
            request_id = f"{job.prefix}-{uuid.uuid4().hex}"
            streams.append(engine.generate(c.prompt_ids, c.params, request_id, c.mm_embeds or None))
            ids.append(request_id)
    except BaseException:
        for i in ids:
            engine.abort(i)
        raise
    state.active += len(choices)
    metrics.prompt_tokens.inc(sum(len(c.prompt_ids) for c in choices))

    events = _merged(choices, streams, metrics, arrived)

    async def release():
        await events.aclose()
        for i in ids:
            engine.abort(i)          # no-op for the finished ones
        state.active -= len(choices)

    if job.stream:
        return _EventStream(job.events(choices, events), release)
    try:
        return await _until_disconnect(request, job.collect(choices, events))
    finally:
        await release()


async def _merged(choices, streams, metrics: Metrics, arrived: float) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
    """Every choice's outputs as they come, tagged with the choice (updated in place)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice, stream):
        last = None
        try:
            async for out in stream:
                now = time.perf_counter()
                if out.token_ids:
                    (metrics.ttft.observe(now - arrived) if last is None else metrics.itl.observe(now - last))
                    last = now
                    metrics.generation_tokens.inc(len(out.token_ids))
                choice.text += out.text
                choice.token_ids += out.token_ids
                choice.logprobs += out.logprobs or []
                if out.prompt_logprobs is not None:
                    choice.prompt_logprobs = out.prompt_logprobs
                choice.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    choice.finish_reason = out.finish_reason
                await queue.put((choice, out))
        except BaseException as e:
            await queue.put(e)
            raise
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body was read before: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work):
    """Run `work` unless the client disconnects first (then it is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)         # nobody is listening
    return task.result()


class _EventStream(Response):
    """Server-sent events from an async iterator of JSON-able dicts, ending `data: [DONE]`;
    stopped (and its sequences aborted) when the client disconnects."""

    def __init__(self, events: AsyncIterator[dict], release: Callable[[], object]):
        super().__init__(media_type="text/event-stream")
        self.events, self.release = events, release

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            try:
                async for event in self.events:
                    data = json.dumps(event, ensure_ascii=False)
                    await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                                "more_body": True})
            except APIError as e:                        # refused after the headers went out
                data = json.dumps(e.body(), ensure_ascii=False)
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        task, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
            with contextlib.suppress(Exception):
                await self.events.aclose()
            await self.release()


def _usage(choices: list[_Choice]) -> dict:
    prompts = {}
    for c in choices:                 # a prompt counts once, however many choices it has
        prompts.setdefault(tuple(c.prompt_ids), c.num_cached_tokens)
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(prompts.values())}}


def _finish(choice: _Choice) -> str:
    return choice.finish_reason or "stop"


# ---------------------------------------------------------------------------- chat

class _Job:
    """One request: its runtime, its checked fields, the id and time its answer carries."""
    prefix = ""

    def __init__(self, rt, req, model: str):
        self.rt, self.req, self.stream, self.model = rt, req, req.stream, model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())


class _ChatJob(_Job):
    prefix = "chatcmpl"

    def choices(self) -> list[_Choice]:
        req, rt = self.req, self.rt
        template = rt.tokenizer.chat_template or ""
        messages = req.messages
        if "tool_calls" not in template:
            messages = [tool_calls_as_text(m) if m["role"] == "assistant" else m for m in messages]
        tools = None
        if req.tools and req.tool_choice != "none":
            tools = req.tools
            if isinstance(req.tool_choice, dict):
                tools = [t for t in req.tools if t["function"]["name"] == req.tool_choice["function"]["name"]]
        # local_images=False: a client may send images as data: URLs, never make us read our own disk
        prompt_ids, mm_embeds = rt.encode_chat(messages, thinking=req.thinking, tools=tools, local_images=False,
                                               **req.template_kwargs)
        # Did the template open a think block itself? Its last few tokens say (not the whole prompt).
        self.in_reasoning = rt.tokenizer.decode(prompt_ids[-8:]).rstrip().endswith(THINK_OPEN)
        # tool_choice required / a named function: the call is begun in the prompt, so the
        # model can only continue it.
        self.forced = ""
        if isinstance(req.tool_choice, dict):
            name = json.dumps(req.tool_choice["function"]["name"], ensure_ascii=False)
            self.forced = f'{CALL_OPEN}\n{{"name": {name}, "arguments": '
        elif req.tool_choice == "required":
            self.forced = f'{CALL_OPEN}\n{{"name": "'
        if self.forced:
            prompt_ids = prompt_ids + rt.tokenizer.encode(self.forced)
            self.in_reasoning = False
        self.parse_tools = tools is not None
        params = with_max_tokens(req, len(prompt_ids), rt.model.max_seq_len, "messages")
        return [_Choice(i, prompt_ids, _seeded(params, i), mm_embeds) for i in range(req.n)]

    def _parser(self) -> ChatTextParser:
        parser = ChatTextParser(in_reasoning=self.in_reasoning, parse_tools=self.parse_tools)
        if self.forced:
            parser.state = "content"
            parser.push(self.forced)
        return parser

    def _logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if not self.req.logprobs:
            return None
        tok = self.rt.tokenizer

        def entry(token_id, logprob):
            data = tok.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top[:self.req.top_logprobs]]}
                            for lp in lps]}

    def _chunk(self, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                      "finish_reason": finish_reason}]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    async def events(self, choices, outputs) -> AsyncIterator[dict]:
        parsers = {c.index: self._parser() for c in choices}
        calls = {c.index: 0 for c in choices}
        for c in choices:
            yield self._chunk(c.index, {"role": "assistant", "content": ""})
        async for choice, out in outputs:
            parser = parsers[choice.index]
            deltas = parser.push(out.text) + (parser.finish() if out.finished else [])
            lps = self._logprobs(out.logprobs or [])
            if lps is not None and not lps["content"]:
                lps = None
            for delta in _joined(deltas):
                if delta.kind == "tool_call":
                    k = calls[choice.index]
                    calls[choice.index] += 1
                    call = delta.call
                    yield self._chunk(choice.index, {"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                                                     "function": {"name": call.name,
                                                                                  "arguments": ""}}]})
                    yield self._chunk(choice.index, {"tool_calls": [{"index": k, "function": {
                        "arguments": call.arguments}}]})
                else:      # the step's token logprobs ride on its text
                    yield self._chunk(choice.index, _text_delta(delta), logprobs=lps)
                    lps = None
            if lps is not None:
                yield self._chunk(choice.index, {}, logprobs=lps)
            if out.finished:
                reason = "tool_calls" if calls[choice.index] else _finish(choice)
                yield self._chunk(choice.index, {}, finish_reason=reason)
        if self.req.include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [], "usage": _usage(choices)}

    async def collect(self, choices, outputs) -> dict:
        async for _ in outputs:
            pass
        results = []
        for c in choices:
            parser = self._parser()
            deltas = parser.push(c.text) + parser.finish()
            reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
            content = "".join(d.text for d in deltas if d.kind == "content")
            calls = [d.call.to_dict() for d in deltas if d.kind == "tool_call"]
            message = {"role": "assistant", "content": content if content or not calls else None}
            if parser.thought:
                message["reasoning_content"] = message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            results.append({"index": c.index, "message": message, "logprobs": self._logprobs(c.logprobs),
                            "finish_reason": "tool_calls" if calls else _finish(c)})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": results, "usage": _usage(choices)}


def _joined(deltas: list[Delta]) -> list[Delta]:
    """Neighbouring text deltas of one kind as one."""
    out: list[Delta] = []
    for d in deltas:
        if out and d.kind != "tool_call" and out[-1].kind == d.kind:
            out[-1] = Delta(d.kind, out[-1].text + d.text)
        else:
            out.append(d)
    return out


def _text_delta(delta: Delta) -> dict:
    if delta.kind == "reasoning":
        return {"reasoning_content": delta.text, "reasoning": delta.text}
    return {"content": delta.text}


def _seeded(params, i: int):
    """Choice i of n draws from seed + i, so seeded choices differ from each other and each
    is reproducible."""
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=(params.seed + i) % 2**63)


# ---------------------------------------------------------------------------- completions

class _CompletionJob(_Job):
    prefix = "cmpl"

    def choices(self) -> list[_Choice]:
        req, rt = self.req, self.rt
        out = []
        for p, prompt in enumerate(req.prompts):
            ids = rt.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            params = with_max_tokens(req, len(ids), rt.model.max_seq_len, "prompt")
            out += [_Choice(p * req.n + j, ids, _seeded(params, j), []) for j in range(req.n)]
        return out

    def _generated(self, c: _Choice, token_ids, lps) -> tuple[list[int], list]:
        """Generated tokens and their logprobs as returned: none at all for max_tokens 0."""
        if self.req.max_tokens == 0:
            return [], []
        return token_ids, lps

    def _logprobs(self, c: _Choice, token_ids: list[int], lps: list[TokenLogprob], offset: int,
                  with_prompt: bool) -> dict | None:
        if self.req.logprobs is None:
            return None
        tok = self.rt.tokenizer
        entries = []
        if with_prompt:
            prompt_lps = c.prompt_logprobs or [None] * len(c.prompt_ids)
            entries += list(zip(c.prompt_ids, prompt_lps))
        entries += list(zip(token_ids, lps))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in entries:
            piece = tok.decode([token_id])
            out["tokens"].append(piece)
            out["text_offset"].append(offset)
            offset += len(piece)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(lp.logprob)
            top: dict[str, float] = {}
            for t, v in [(lp.token_id, lp.logprob), *lp.top[:self.req.logprobs]]:
                key = tok.decode([t])
                top[key] = max(v, top.get(key, v))
            out["top_logprobs"].append(top)
        return out

    def _prompt_text(self, c: _Choice) -> str:
        return self.rt.tokenizer.decode(c.prompt_ids)

    def _choice(self, index: int, text: str, logprobs, finish_reason) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    async def collect(self, choices, outputs) -> dict:
        async for _ in outputs:
            pass
        results = []
        for c in choices:
            token_ids, lps = self._generated(c, c.token_ids, c.logprobs)
            text = c.text if token_ids else ""
            head = self._prompt_text(c) if self.req.echo else ""
            results.append(self._choice(c.index, head + text,
                                        self._logprobs(c, token_ids, lps, 0, self.req.echo),
                                        "length" if self.req.max_tokens == 0 else _finish(c)))
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": results, "usage": _usage(choices)}

    async def events(self, choices, outputs) -> AsyncIterator[dict]:
        offsets = {c.index: 0 for c in choices}
        echoed = set()

        def chunk(choice_dict):
            out = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [choice_dict]}
            if self.req.include_usage:
                out["usage"] = None
            return out

        async for c, out in outputs:
            token_ids, lps = self._generated(c, out.token_ids, out.logprobs or [])
            head, with_prompt = "", False
            if self.req.echo and c.index not in echoed:
                echoed.add(c.index)
                head, with_prompt = self._prompt_text(c), True
            text = head + (out.text if token_ids else "")
            logprobs = self._logprobs(c, token_ids, lps, offsets[c.index], with_prompt)
            offsets[c.index] += len(text)
            reason = ("length" if self.req.max_tokens == 0 else _finish(c)) if out.finished else None
            if text or logprobs and logprobs["tokens"] or reason:
                yield chunk(self._choice(c.index, text, logprobs, reason))
        if self.req.include_usage:
            yield {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [], "usage": _usage(choices)}


# ---------------------------------------------------------------------------- `smollm3 serve`

def run_server(load: Callable[[], object], *, host: str, port: int, served_model_name: str,
               api_key: str | None, max_waiting: int, describe: str) -> int:
    """Serve until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests finish
    (up to a grace period), then the engine aborts what is left; exit status 0."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(load, served_model_name=served_model_name, api_key=api_key, max_waiting=max_waiting)
    log.info("smollm3 serve: %s as %r on http://%s:%d%s", describe, served_model_name, host, port,
             " (API key required)" if api_key else "")
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
