"""POST /v1/responses: the pipeline's choice as an OpenAI Response, streamed or whole.

Output items come from the parser's deltas in order: reasoning -> a `reasoning` item
(reasoning_text content), content -> a `message` item (output_text), a tool call -> a
`function_call` item whose arguments stream as they are written. Streamed, each event with its
`event:` line and a sequence_number:

    response.created, response.in_progress, then per item: response.output_item.added,
    (message) response.content_part.added, response.output_text.delta..., response.output_text.done,
    response.content_part.done; (reasoning) response.reasoning_text.delta..., .done;
    (function_call) response.function_call_arguments.delta..., .done; response.output_item.done;
    and response.completed (or response.incomplete when max_output_tokens ran out)

Nothing is stored: the response says `store: false`, and no later request can refer to it.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from ..pipeline import Choice, Generation, Usage, chat_choices
from ..sse import answer, event_frame
from ..state import ServerState
from .protocol_responses import ResponsesRequest


async def create_response(request: Request, state: ServerState, req: ResponsesRequest) -> Response:
    rt = state.ready()
    (choice,) = await asyncio.to_thread(chat_choices, rt, req.chat)
    gen = Generation(state.engine, state.admission, state.metrics, [choice], "resp")
    response = _Response(req, state.served_model_name, choice)
    return await answer(request, gen, req.stream, lambda: response.events(gen.outputs()),
                        lambda: response.collect(gen.outputs()), frame=event_frame,
                        error_frame=lambda e: event_frame(response.error_event(e)))


def _hex() -> str:
    return uuid.uuid4().hex


class _Response:
    def __init__(self, req: ResponsesRequest, model: str, choice: Choice):
        self.req, self.model, self.choice = req, model, choice
        self.id = f"resp_{_hex()}"
        self.created = int(time.time())
        self.sequence = 0

    def body(self, status: str, output: list[dict]) -> dict:
        done = status != "in_progress"
        u = Usage.of([self.choice])
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "completed_at": int(time.time()) if done else None, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": self.model, "output": output, **({"usage": {
                    "input_tokens": u.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
                    "output_tokens": u.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": self.choice.reasoning_tokens},
                    "total_tokens": u.prompt_tokens + u.completion_tokens}} if done else {}),
                "store": False, "previous_response_id": None, "truncation": "disabled", "background": False,
                "service_tier": "default", **self.req.echo}

    def _status(self) -> str:
        return "incomplete" if self.choice.finish_reason == "length" else "completed"

    def _items(self) -> list[dict]:
        """The finished output items, from the choice's deltas."""
        items: list[dict] = []
        for d in self.choice.deltas:
            last = items[-1] if items else None
            if d.kind == "reasoning":
                if last is not None and last["type"] == "reasoning":
                    last["content"][0]["text"] += d.text
                else:
                    items.append(_reasoning(d.text))
            elif d.kind == "content":
                if last is not None and last["type"] == "message":
                    last["content"][0]["text"] += d.text
                else:
                    items.append(_message(d.text))
            elif d.kind == "tool_call":
                items.append(_call(d.call.id, d.call.name))
            else:
                last["arguments"] += d.text
        for item in items:
            item["status"] = "completed"
        if items and self._status() == "incomplete":      # cut off by max_output_tokens
            items[-1]["status"] = "incomplete"
        return items

    async def collect(self, outputs) -> dict:
        async for _ in outputs:
            pass
        return self.body(self._status(), self._items())

    def _event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def error_event(self, e) -> dict:
        return self._event("error", code=e.code, message=e.message, param=e.param)

    async def events(self, outputs):
        yield self._event("response.created", response=self.body("in_progress", []))
        yield self._event("response.in_progress", response=self.body("in_progress", []))
        done: list[dict] = []
        item: dict | None = None
        async for _, _, deltas in outputs:
            for d in deltas:
                kind = {"reasoning": "reasoning", "content": "message"}.get(d.kind, "function_call")
                if d.kind == "tool_call" or item is None or item["type"] != kind:
                    if item is not None:
                        for event in self._close(item, len(done)):
                            yield event
                        done.append(item)
                    item = _reasoning("") if kind == "reasoning" else _message("") if kind == "message" else \
                        _call(d.call.id, d.call.name)
                    for event in self._open(item, len(done)):
                        yield event
                    if d.kind == "tool_call":
                        continue
                at = {"item_id": item["id"], "output_index": len(done)}
                if kind == "reasoning":
                    item["content"][0]["text"] += d.text
                    yield self._event("response.reasoning_text.delta", **at, content_index=0, delta=d.text)
                elif kind == "message":
                    item["content"][0]["text"] += d.text
                    yield self._event("response.output_text.delta", **at, content_index=0, delta=d.text, logprobs=[])
                else:
                    item["arguments"] += d.text
                    yield self._event("response.function_call_arguments.delta", **at, delta=d.text)
        if item is not None:
            for event in self._close(item, len(done)):
                yield event
            done.append(item)
        status = self._status()
        yield self._event(f"response.{status}", response=self.body(status, done))

    def _open(self, item: dict, index: int):
        yield self._event("response.output_item.added", output_index=index,
                          item={**item, "status": "in_progress", **({"content": []} if item["type"] == "message"
                                                                      else {})})
        if item["type"] == "message":
            yield self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def _close(self, item: dict, index: int):
        item["status"] = "completed" if self._status() == "completed" else "incomplete"
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            yield self._event("response.reasoning_text.done", **at, content_index=0, text=item["content"][0]["text"])
        elif item["type"] == "message":
            part = item["content"][0]
            yield self._event("response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[])
            yield self._event("response.content_part.done", **at, content_index=0, part=part)
        else:
            yield self._event("response.function_call_arguments.done", **at, name=item["name"],
                              arguments=item["arguments"])
        yield self._event("response.output_item.done", output_index=index, item=item)


def _reasoning(text: str) -> dict:
    return {"type": "reasoning", "id": f"rs_{_hex()}", "summary": [], "content": [{"type": "reasoning_text",
                                                                                     "text": text}]}


def _message(text: str) -> dict:
    return {"type": "message", "id": f"msg_{_hex()}", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call(call_id: str, name: str) -> dict:
    return {"type": "function_call", "id": f"fc_{call_id.removeprefix('call_')}", "call_id": call_id, "name": name,
            "arguments": ""}
