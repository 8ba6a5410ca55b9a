"""Answers raced against the client: a JSON answer or a server-sent event stream, either
cancelled the moment the client disconnects (vLLM's way: the ASGI `http.disconnect`
message, not polling), so its sequences are aborted and their KV blocks free at once."""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from .errors import APIError


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body was read before: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable):
    """Run `work` unless the client disconnects first (then it is cancelled: 499)."""
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


def data_frame(event: dict) -> bytes:
    """`data: {json}`: OpenAI's chat and completion frames."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def event_frame(event: dict) -> bytes:
    """`event: <its type>` then `data: {json}`: the Messages and Responses APIs' frames."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


class EventStream(Response):
    """Server-sent events from an async iterator of frames; `error_frame` renders a refusal
    that comes after the headers went out, `last` closes the stream (OpenAI: `data: [DONE]`).
    Stopped, and `release` called, when the events end or the client disconnects."""

    def __init__(self, frames: AsyncIterator[bytes], release: Callable[[], Awaitable], *,
                 error_frame: Callable[[APIError], bytes], last: bytes = b""):
        super().__init__(media_type="text/event-stream")
        self.frames, self.release, self.error_frame, self.last = frames, release, error_frame, last

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            try:
                async for frame in self.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
            except APIError as e:
                await send({"type": "http.response.body", "body": self.error_frame(e), "more_body": True})
            await send({"type": "http.response.body", "body": self.last, "more_body": False})

        task, watcher = asyncio.ensure_future(pump()), asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
            with contextlib.suppress(Exception):
                await self.frames.aclose()
            await self.release()


async def answer(request: Request, gen, stream: bool, events: Callable[[], AsyncIterator[dict]],
                 collect: Callable[[], Awaitable[dict]], *, frame: Callable[[dict], bytes],
                 error_frame: Callable[[APIError], bytes], last: bytes = b"") -> Response:
    """Start the generation (a pipeline.Generation: refusals come before any byte), then answer
    with `events()` streamed as `frame`s, or with `collect()` as one JSON body; either raced
    against the client, and the generation released however it ends."""
    gen.start()
    if stream:
        return EventStream((frame(event) async for event in events()), gen.release, error_frame=error_frame,
                           last=last)
    try:
        return await until_disconnect(request, collect())
    finally:
        await gen.release()
