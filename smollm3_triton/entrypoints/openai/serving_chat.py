"""POST /v1/chat/completions: the pipeline's choices as OpenAI chat completions, and the answer
both OpenAI endpoints give (streamed or one JSON body).

Streamed: a role chunk per choice, then `delta.reasoning_content` (and vLLM's
`delta.reasoning`), `delta.content` and `delta.tool_calls` (index, id, type and name, then
the arguments in pieces as the model writes them) as the pipeline splits them, a finish chunk per choice, and with
`stream_options.include_usage` a last chunk with `choices: []` and the usage (with vLLM's
`continuous_usage_stats`, every chunk carries the usage so far). Not streamed: the same
deltas joined into one message per choice. Each choice names the stop string (or stop token
id) that ended it in vLLM's `stop_reason`.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from ...engine.outputs import TokenLogprob
from ..pipeline import ChatInput, Choice, Generation, Usage, chat_choices
from ..sse import answer, data_frame
from ..state import ServerState
from .protocol import ChatRequest


def usage_body(choices: list[Choice]) -> dict:
    u = Usage.of(choices)
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


async def create_chat_completion(request: Request, state: ServerState, req: ChatRequest) -> Response:
    rt = state.ready()
    # Off the event loop: rendering, tokenizing and above all encoding images is model work.
    chat = ChatInput(req.messages, req.params, req.max_tokens is not None, req.tools, req.tool_choice, req.thinking,
                     req.template_kwargs, req.n, parallel_tool_calls=req.parallel_tool_calls)
    choices = await asyncio.to_thread(chat_choices, rt, chat)
    gen = Generation(state.engine, state.admission, state.metrics, choices, "chatcmpl")
    answer = _ChatAnswer(req, state.served_model_name, rt.tokenizer, choices)
    return await respond(request, gen, req.stream, lambda: answer.events(gen.outputs()),
                         lambda: answer.collect(gen.outputs()))


async def respond(request: Request, gen: Generation, stream: bool, events: Callable[[], AsyncIterator[dict]],
                  collect: Callable[[], Awaitable[dict]]) -> Response:
    """OpenAI chat and completions: `data:` frames ending `data: [DONE]`, or one JSON body."""
    return await answer(request, gen, stream, events, collect, frame=data_frame,
                        error_frame=lambda e: data_frame(e.openai_body()), last=b"data: [DONE]\n\n")


class _ChatAnswer:
    def __init__(self, req: ChatRequest, model: str, tokenizer, choices: list[Choice]):
        self.req, self.model, self.tokenizer, self.choices = req, model, tokenizer, choices
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _logprobs(self, lps: list[TokenLogprob]) -> dict | None:
        if not self.req.logprobs:
            return None

        def entry(token_id, logprob):
            data = self.tokenizer.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return {"content": [{**entry(lp.token_id, lp.logprob),
                             "top_logprobs": [entry(t, v) for t, v in lp.top[:self.req.top_logprobs]]}
                            for lp in lps], "refusal": None}

    def _chunk(self, choices: list[dict], usage=None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.req.continuous_usage:
            chunk["usage"] = usage_body(self.choices)
        elif self.req.include_usage:
            chunk["usage"] = usage
        return chunk

    def _delta(self, index: int, delta: dict, finish_reason=None, logprobs=None, stop_reason=None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return self._chunk([choice])

    async def events(self, outputs):
        calls = {c.index: 0 for c in self.choices}
        for c in self.choices:
            yield self._delta(c.index, {"role": "assistant", "content": ""})
        async for choice, out, deltas in outputs:
            lps = self._logprobs(out.logprobs or [])
            if lps is not None and not lps["content"]:
                lps = None
            for delta in deltas:
                if delta.kind == "tool_call":       # the name first, then the arguments in pieces
                    calls[choice.index] += 1
                    call = delta.call
                    yield self._delta(choice.index, {"tool_calls": [{
                        "index": calls[choice.index] - 1, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]})
                elif delta.kind == "tool_arguments":
                    yield self._delta(choice.index, {"tool_calls": [{"index": calls[choice.index] - 1, "function": {
                        "arguments": delta.text}}]})
                elif delta.kind == "reasoning":      # the step's token logprobs ride on its text
                    yield self._delta(choice.index, {"reasoning_content": delta.text, "reasoning": delta.text},
                                      logprobs=lps)
                    lps = None
                else:
                    yield self._delta(choice.index, {"content": delta.text}, logprobs=lps)
                    lps = None
            if lps is not None:
                yield self._delta(choice.index, {}, logprobs=lps)
            if out.finished:
                yield self._delta(choice.index, {}, finish_reason=_finish_reason(choice),
                                  stop_reason=choice.stop_reason)
        if self.req.include_usage:
            yield self._chunk([], usage_body(self.choices))

    async def collect(self, outputs) -> dict:
        async for _ in outputs:
            pass
        results = []
        for c in self.choices:
            calls = [call.to_dict() for call in c.tool_calls]
            content = c.joined("content")
            message = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
            if c.parser.thought:
                message["reasoning_content"] = message["reasoning"] = c.joined("reasoning")
            if calls:
                message["tool_calls"] = calls
            results.append({"index": c.index, "message": message, "logprobs": self._logprobs(c.logprobs),
                            "finish_reason": _finish_reason(c), "stop_reason": c.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": results, "usage": usage_body(self.choices)}


def _finish_reason(choice: Choice) -> str:
    return "tool_calls" if choice.tool_calls else (choice.finish_reason or "stop")
