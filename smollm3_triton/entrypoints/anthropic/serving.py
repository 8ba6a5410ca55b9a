"""POST /v1/messages: the pipeline's choice as an Anthropic message, streamed or whole.

The content blocks come from the parser's deltas in order: reasoning -> a `thinking` block,
content -> a `text` block, a tool call -> a `tool_use` block whose input streams as
`input_json_delta` pieces. Streamed, as the API sends it:

    message_start, ping, then per block: content_block_start, content_block_delta...,
    content_block_stop; message_delta (stop_reason, stop_sequence, output_tokens), message_stop

stop_reason: `max_tokens` when the budget ran out, `tool_use` when the answer called a tool,
`stop_sequence` (naming it) when a stop string ended it, else `end_turn`. Usage in the API's
terms: input_tokens are the prompt tokens the prefix cache did not serve
(cache_read_input_tokens), so their sum is the prompt.
"""
from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import Request
from fastapi.responses import Response

from ..pipeline import ChatInput, Choice, Generation, Usage, chat_choices, chat_prompt
from ..sse import answer, event_frame
from ..state import ServerState
from .protocol import MessagesRequest


async def create_message(request: Request, state: ServerState, req: MessagesRequest) -> Response:
    rt = state.ready()
    (choice,) = await asyncio.to_thread(chat_choices, rt, req.chat)
    gen = Generation(state.engine, state.admission, state.metrics, [choice], "msg")
    message = _Message(state.served_model_name, choice)
    return await answer(request, gen, req.stream, lambda: message.events(gen.outputs()),
                        lambda: message.collect(gen.outputs()), frame=event_frame,
                        error_frame=lambda e: event_frame(e.anthropic_body()))


async def count_tokens(state: ServerState, chat: ChatInput) -> dict:
    rt = state.ready()
    prompt_ids, _, _ = await asyncio.to_thread(chat_prompt, rt, chat)
    return {"input_tokens": len(prompt_ids)}


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _usage(choice: Choice) -> dict:
    u = Usage.of([choice])
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


class _Message:
    def __init__(self, model: str, choice: Choice):
        self.model, self.choice = model, choice
        self.id = f"msg_{uuid.uuid4().hex}"

    def _stop(self) -> tuple[str, str | None]:
        c = self.choice
        if c.finish_reason == "length":
            return "max_tokens", None
        if c.tool_calls:
            return "tool_use", None
        if isinstance(c.stop_reason, str):
            return "stop_sequence", c.stop_reason
        return "end_turn", None

    def _head(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    async def collect(self, outputs) -> dict:
        async for _ in outputs:
            pass
        blocks: list[dict] = []
        for d in self.choice.deltas:
            last = blocks[-1] if blocks else None
            if d.kind == "reasoning":
                if last is not None and last["type"] == "thinking":
                    last["thinking"] += d.text
                else:
                    blocks.append({"type": "thinking", "thinking": d.text, "signature": ""})
            elif d.kind == "content":
                if last is not None and last["type"] == "text":
                    last["text"] += d.text
                else:
                    blocks.append({"type": "text", "text": d.text})
            elif d.kind == "tool_call":
                blocks.append({"type": "tool_use", "id": _tool_id(d.call.id), "name": d.call.name, "input": ""})
            else:                                  # tool_arguments: the input's JSON text, in pieces
                last["input"] += d.text
        for b in blocks:
            if b["type"] == "tool_use":
                b["input"] = _parsed(b["input"])
        stop_reason, stop_sequence = self._stop()
        return {**self._head(), "content": blocks, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": _usage(self.choice)}

    async def events(self, outputs):
        start = {**self._head(), "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**_usage(self.choice), "output_tokens": 0}}
        yield {"type": "message_start", "message": start}
        yield {"type": "ping"}
        index, open_kind = -1, None
        async for _, _, deltas in outputs:
            for d in deltas:
                kind = {"reasoning": "thinking", "content": "text"}.get(d.kind, "tool_use")
                if d.kind == "tool_call" or kind != open_kind:
                    if open_kind is not None:
                        yield {"type": "content_block_stop", "index": index}
                    index, open_kind = index + 1, kind
                    block = {"thinking": {"type": "thinking", "thinking": "", "signature": ""},
                             "text": {"type": "text", "text": ""}}.get(kind)
                    if block is None:
                        block = {"type": "tool_use", "id": _tool_id(d.call.id), "name": d.call.name, "input": {}}
                    yield {"type": "content_block_start", "index": index, "content_block": block}
                    if d.kind == "tool_call":
                        continue
                delta = {"thinking": {"type": "thinking_delta", "thinking": d.text},
                         "text": {"type": "text_delta", "text": d.text},
                         "tool_use": {"type": "input_json_delta", "partial_json": d.text}}[kind]
                yield {"type": "content_block_delta", "index": index, "delta": delta}
        if open_kind is not None:
            yield {"type": "content_block_stop", "index": index}
        stop_reason, stop_sequence = self._stop()
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": _usage(self.choice)}
        yield {"type": "message_stop"}


def _parsed(arguments: str) -> dict:
    """A call's arguments as the input object (empty if the answer was cut off inside it)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
