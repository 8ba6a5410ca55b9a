"""POST /v1/completions: raw prompts (strings or token ids, n choices each) continued.

`echo` puts the prompt before the text; `logprobs` scores prompt (with echo) and completion
tokens in the legacy shape (tokens, token_logprobs, top_logprobs, text_offset), which is what
lm-evaluation-harness's `local-completions` reads; `max_tokens: 0` with echo scores the
prompt alone and reports no completion tokens.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request
from fastapi.responses import Response

from ...engine.outputs import TokenLogprob
from ..pipeline import Choice, Generation, completion_choices
from ..state import ServerState
from .protocol import CompletionRequest
from .serving_chat import respond, usage_body


async def create_completion(request: Request, state: ServerState, req: CompletionRequest) -> Response:
    rt = state.ready()
    choices = await asyncio.to_thread(completion_choices, rt, req.prompts, req.params, req.max_tokens is not None,
                                      req.n)
    gen = Generation(state.engine, state.admission, state.metrics, choices, "cmpl")
    answer = _CompletionAnswer(req, state.served_model_name, rt.tokenizer, choices)
    return await respond(request, gen, req.stream, lambda: answer.events(gen.outputs()),
                         lambda: answer.collect(gen.outputs()))


class _CompletionAnswer:
    def __init__(self, req: CompletionRequest, model: str, tokenizer, choices: list[Choice]):
        self.req, self.model, self.tokenizer, self.choices = req, model, tokenizer, choices
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.scores_only = req.max_tokens == 0     # the one token generated to score the prompt is not shown

    def _generated(self, token_ids, lps) -> tuple[list[int], list]:
        return ([], []) if self.scores_only else (token_ids, lps)

    def _finish_reason(self, c: Choice) -> str:
        return "length" if self.scores_only else (c.finish_reason or "stop")

    def _logprobs(self, c: Choice, token_ids: list[int], lps: list[TokenLogprob], offset: int,
                  with_prompt: bool) -> dict | None:
        if self.req.logprobs is None:
            return None
        tok = self.tokenizer
        entries = []
        if with_prompt:
            entries += list(zip(c.prompt_ids, c.prompt_logprobs or [None] * len(c.prompt_ids)))
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

    def _body(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def _choice(self, index: int, text: str, logprobs, finish_reason, stop_reason=None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return choice

    def _usage(self) -> dict:
        usage = usage_body(self.choices)
        if self.scores_only:
            usage["completion_tokens"], usage["total_tokens"] = 0, usage["prompt_tokens"]
        return usage

    async def collect(self, outputs) -> dict:
        async for _ in outputs:
            pass
        results = []
        for c in self.choices:
            token_ids, lps = self._generated(c.token_ids, c.logprobs)
            text = c.text if token_ids else ""
            head = self.tokenizer.decode(c.prompt_ids) if self.req.echo else ""
            results.append(self._choice(c.index, head + text, self._logprobs(c, token_ids, lps, 0, self.req.echo),
                                        self._finish_reason(c), c.stop_reason))
        return self._body(results, usage=self._usage())

    async def events(self, outputs):
        offsets = {c.index: 0 for c in self.choices}
        echoed = set()
        async for c, out, _ in outputs:
            token_ids, lps = self._generated(out.token_ids, out.logprobs or [])
            head, with_prompt = "", False
            if self.req.echo and c.index not in echoed:
                echoed.add(c.index)
                head, with_prompt = self.tokenizer.decode(c.prompt_ids), True
            text = head + (out.text if token_ids else "")
            logprobs = self._logprobs(c, token_ids, lps, offsets[c.index], with_prompt)
            offsets[c.index] += len(text)
            reason = self._finish_reason(c) if out.finished else None
            if text or logprobs and logprobs["tokens"] or reason:
                extra = {"usage": self._usage()} if self.req.continuous_usage else \
                    {"usage": None} if self.req.include_usage else {}
                yield self._body([self._choice(c.index, text, logprobs, reason, c.stop_reason)], **extra)
        if self.req.include_usage:
            yield self._body([], usage=self._usage())
