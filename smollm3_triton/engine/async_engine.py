"""The engine for asyncio servers: one background thread steps the engine; each
request's outputs reach its own asyncio queue, so a slow consumer never holds up the batch."""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from ..errors import RequestError
from ..sampling_params import SamplingParams
from .engine import Engine
from .outputs import EngineStats, RequestOutput


class AsyncEngine:
    """The engine for asyncio servers: one background thread runs step() while there is
    work; each request's outputs reach its own asyncio queue, so a slow consumer never
    holds up the batch."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="smollm3-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                outputs = self.engine.step()
            except BaseException as e:       # a broken step fails every request, never hangs them
                self._fail_all(e)
                continue
            for out in outputs:
                target = self._queues.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, (loop, queue) in list(self._queues.items()):
            self.engine.abort(request_id)
            loop.call_soon_threadsafe(queue.put_nowait, error)

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 mm_embeds=None) -> AsyncIterator[RequestOutput]:
        """Queue a request now (refused here with RequestError, before anything is sent to
        a client) and return the async iterator of its outputs until it finishes. Leaving
        the iterator early (a cancelled task, a closed generator) aborts the request; one
        never iterated must be aborted by the caller."""
        if self._stopping:
            raise RequestError("the engine is shutting down")
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request_id = self.engine.add_request(prompt_ids, params, request_id, mm_embeds)
        self._queues[request_id] = (loop, queue)
        with self._wake:
            self._wake.notify()
        return self._outputs(request_id, queue)

    async def _outputs(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out}") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.engine.abort(request_id)

    @property
    def max_num_seqs(self) -> int:
        return self.engine.max_num_seqs

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        with self._wake:
            self._wake.notify()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Abort whatever is pending (each request ends with "abort") and stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=60)
        for request_id in list(self._queues):
            self.engine.abort(request_id)
        # The step thread has stopped: one more step here only hands out the abort outputs.
        for out in self.engine.step():
            target = self._queues.get(out.request_id)
            if target is not None:
                target[0].call_soon_threadsafe(target[1].put_nowait, out)
