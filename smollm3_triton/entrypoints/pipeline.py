"""The request pipeline every API shares, from a checked request to its outputs.

    chat_choices / completion_choices   prompt ids per choice (template, tools, images), and the
                                         output constraint (response format, tool calls) compiled
 -> Generation.start                     admission (503 past capacity), one sequence per choice
 -> Generation.outputs                   every choice's outputs as they come, each split once
                                         into reasoning / content / tool calls by its parser
 -> Generation.release                   sequences aborted (KV blocks free), admission given back

An API (openai/serving_chat.py, ...) only turns these into its wire format, streamed or not:
the non-streamed answer is built from the same deltas as the streamed one.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..chat_parser import CALL_CLOSE, CALL_OPEN, ChatTextParser, Delta, ToolCall, tool_calls, tool_calls_as_text
from ..engine.async_engine import AsyncEngine
from ..engine.outputs import RequestOutput, TokenLogprob
from ..engine.structured_output import choice_grammar
from ..sampling_params import SamplingParams, StructuredOutputs
from .errors import APIError
from .metrics import Metrics


@dataclass
class Choice:
    """One sequence of a request: its prompt, and what it has produced so far."""
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    mm_embeds: list
    parser: ChatTextParser | None = None      # chat: splits the text; None: raw completion text
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None        # the stop string (or stop token id) that ended it
    num_cached_tokens: int = 0
    reasoning_tokens: int = 0                   # tokens written inside the think block, its close included
    deltas: list[Delta] = field(default_factory=list)   # everything the parser has split so far

    def absorb(self, out: RequestOutput) -> list[Delta]:
        """Take one engine output; -> the deltas it completes (text of one kind joined)."""
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.parser is not None and self.parser.state == "reasoning":
            self.reasoning_tokens += len(out.token_ids)
        if self.parser is None:
            new = [Delta("content", out.text)] if out.text else []
        else:
            new = _joined(self.parser.push(out.text) + (self.parser.finish() if out.finished else []))
        self.deltas += new
        return new

    @property
    def tool_calls(self) -> list[ToolCall]:
        return tool_calls(self.deltas)

    def joined(self, kind: str) -> str:
        return "".join(d.text for d in self.deltas if d.kind == kind)


def _joined(deltas: list[Delta]) -> list[Delta]:
    """Neighbouring text deltas of one kind as one."""
    out: list[Delta] = []
    for d in deltas:
        if out and d.kind != "tool_call" and out[-1].kind == d.kind:
            out[-1] = Delta(d.kind, out[-1].text + d.text)
        else:
            out.append(d)
    return out


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int          # each distinct prompt once, however many choices it has
    completion_tokens: int
    cached_tokens: int

    @classmethod
    def of(cls, choices: list[Choice]) -> Usage:
        prompts: dict[tuple, int] = {}
        for c in choices:
            prompts.setdefault(tuple(c.prompt_ids), c.num_cached_tokens)
        return cls(sum(len(p) for p in prompts), sum(len(c.token_ids) for c in choices), sum(prompts.values()))


# ---------------------------------------------------------------------------- choices

@dataclass(frozen=True)
class ChatInput:
    """A chat request in the library's terms, whichever API it came from. Its output
    constraint, if any, is params.structured_outputs (each API parses its own fields into
    one: response_format, output_config.format, text.format, ...); chat_choices joins it
    with the tool calls that tool_choice asks for."""
    messages: list[dict]
    params: SamplingParams
    max_tokens_given: bool = True         # False: max_new_tokens becomes the rest of the context
    tools: list[dict] | None = None       # [{"type": "function", "function": {"name", "parameters", ...}}]
    tool_choice: str | dict = "none"      # "none" | "auto" | "required" | {"function": {"name": ...}}
    thinking: bool | None = None
    template_kwargs: dict = field(default_factory=dict)
    n: int = 1
    # Where each tool's parameter schema sits in the API's request, named in errors
    # (default: OpenAI chat's "tools[i].function.parameters").
    tool_params: tuple[str, ...] | None = None
    parallel_tool_calls: bool = True      # False: at most one call per answer


def chat_choices(rt, chat: ChatInput, prompt_param: str = "messages") -> list[Choice]:
    """Render the conversation through the model's template; each choice gets its own parser.
    The output constraint (the request's, and the tool calls') is compiled here: a bad one is
    refused before anything runs. Model work (tokenizing, encoding images, compiling grammars):
    call it off the event loop."""
    for i, tool in enumerate(chat.tools or []):
        param = chat.tool_params[i] if chat.tool_params else f"tools[{i}].function.parameters"
        rt.engine.grammars.check_schema(tool["function"].get("parameters") or {"type": "object"}, param)
    prompt_ids, mm_embeds, tools = chat_prompt(rt, chat)
    params = _with_max_tokens(chat.params, chat.max_tokens_given, len(prompt_ids), rt.max_seq_len, prompt_param)
    spec = _chat_constraint(rt, chat, params.structured_outputs)
    if spec is not None:
        # A reasoning model thinks freely first: the constraint starts after its </think>.
        spec = dataclasses.replace(spec, after=rt.reasoning_end(prompt_ids))
        rt.engine.grammars.compile(spec)
    params = dataclasses.replace(params, structured_outputs=spec)
    in_reasoning = rt.opens_reasoning(prompt_ids)
    return [Choice(i, prompt_ids, _seeded(params, i), mm_embeds,
                   ChatTextParser(in_reasoning=in_reasoning, parse_tools=tools is not None)) for i in range(chat.n)]


def chat_prompt(rt, chat: ChatInput) -> tuple[list[int], list, list[dict] | None]:
    """The prompt ids of a conversation, its image rows, and the tools the template was shown
    (those tool_choice allows). Model work: call it off the event loop."""
    template = rt.tokenizer.chat_template or ""
    messages = chat.messages
    if "tool_calls" not in template:
        messages = [tool_calls_as_text(m) if m["role"] == "assistant" else m for m in messages]
    tools = None
    if chat.tools and chat.tool_choice != "none":
        tools = chat.tools
        if isinstance(chat.tool_choice, dict):
            tools = [t for t in chat.tools if t["function"]["name"] == chat.tool_choice["function"]["name"]]
    # local_images=False: a client may send images as data: URLs, never make us read our own disk
    prompt_ids, mm_embeds = rt.encode_chat(messages, thinking=chat.thinking, tools=tools, local_images=False,
                                           **chat.template_kwargs)
    return prompt_ids, mm_embeds, tools


def _chat_constraint(rt, chat: ChatInput, response: StructuredOutputs | None) -> StructuredOutputs | None:
    """The request's own constraint, joined with its tools' calls as the tool choice asks:
    a named function or "required" -> nothing but calls (named: exactly that one), each
    `<tool_call>` JSON under its function's parameter schema; "auto" -> free text (or the
    request's own format) in which a call, once begun, is constrained (under the parameter
    schema for strict tools, any JSON object of arguments for the others)."""
    if not chat.tools or chat.tool_choice == "none":
        return response
    named = chat.tool_choice["function"]["name"] if isinstance(chat.tool_choice, dict) else None
    tags = []
    for tool in chat.tools:
        fn = tool["function"]
        if named is not None and fn["name"] != named:
            continue
        schema = fn.get("parameters") or {"type": "object"}     # checked by chat_choices
        if chat.tool_choice == "auto" and fn.get("strict") is not True:
            schema = {"type": "object"}
        tags.append({"type": "tag", "content": {"type": "json_schema", "json_schema": schema},
                     "begin": f'{CALL_OPEN}\n{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": ',
                     "end": f"}}\n{CALL_CLOSE}"})
    one = named is not None or not chat.parallel_tool_calls
    if chat.tool_choice == "auto" and response is None:
        fmt = {"type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "stop_after_first": one}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
               "stop_after_first": one}
        if chat.tool_choice == "auto":           # either the request's own format, or calls
            fmt = {"type": "or", "elements": [_as_format(response), fmt]}
    return StructuredOutputs(structural_tag={"type": "structural_tag", "format": fmt},
                             param=response.param if response is not None else "tools")


def _as_format(spec: StructuredOutputs) -> dict:
    """A constraint as one element of a structural tag."""
    kind, value = spec.kind, spec.value
    if kind == "json":
        return {"type": "json_schema", "json_schema": value}
    if kind == "regex":
        return {"type": "regex", "pattern": value}
    if kind in ("choice", "grammar"):
        return {"type": "grammar", "grammar": choice_grammar(value) if kind == "choice" else value}
    return value.get("format", value)


def completion_choices(rt, prompts: list, params: SamplingParams, max_tokens_given: bool, n: int,
                       prompt_param: str = "prompt") -> list[Choice]:
    """Raw prompts (strings or token ids), n choices each, no template; an output constraint
    is compiled here (refused before anything runs)."""
    if params.structured_outputs is not None:
        rt.engine.grammars.compile(params.structured_outputs)
    out = []
    for p, prompt in enumerate(prompts):
        ids = rt.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        full = _with_max_tokens(params, max_tokens_given, len(ids), rt.max_seq_len, prompt_param)
        out += [Choice(p * n + j, ids, _seeded(full, j), []) for j in range(n)]
    return out


def _with_max_tokens(params: SamplingParams, given: bool, n_prompt: int, context: int, param: str) -> SamplingParams:
    """max_new_tokens as asked, or (asked for nothing) the rest of the context."""
    if given:
        return params
    room = context - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt has {n_prompt} tokens, which fills the context of {context} tokens "
                            f"(at most {context - 1} leave room for an answer)", param=param,
                       code="context_length_exceeded")
    return dataclasses.replace(params, max_new_tokens=min(room, params.max_new_tokens))


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of n draws from seed + i, so seeded choices differ from each other and each
    is reproducible."""
    return params if params.seed is None or i == 0 else dataclasses.replace(params, seed=(params.seed + i) % 2**63)


# ---------------------------------------------------------------------------- on the engine

class Admission:
    """Sequences admitted and not yet released, against what the engine runs plus what may wait."""

    def __init__(self, capacity: int):
        self.capacity, self.active = capacity, 0

    def admit(self, n: int) -> None:
        if self.active + n > self.capacity:
            raise APIError(503, f"the server is at capacity ({self.active} sequences in flight, "
                                f"{self.capacity} at most): retry later", type="unavailable_error", code="queue_full")
        self.active += n

    def release(self, n: int) -> None:
        self.active -= n


class Generation:
    """One request's choices on the engine, from admission to release."""

    def __init__(self, engine: AsyncEngine, admission: Admission, metrics: Metrics, choices: list[Choice],
                 prefix: str):
        self.engine, self.admission, self.metrics, self.choices = engine, admission, metrics, choices
        self.prefix = prefix
        self.ids: list[str] = []
        self._streams: list = []
        self._outputs: AsyncIterator | None = None

    def start(self) -> None:
        """Admit every choice now (refusals come before any byte is sent)."""
        self.admission.admit(len(self.choices))
        try:
            for c in self.choices:
                request_id = f"{self.prefix}-{uuid.uuid4().hex}"
                self._streams.append(self.engine.generate(c.prompt_ids, c.params, request_id, c.mm_embeds or None))
                self.ids.append(request_id)
        except BaseException:
            for i in self.ids:
                self.engine.abort(i)
            self.admission.release(len(self.choices))
            raise
        self.metrics.prompt_tokens.inc(sum(len(c.prompt_ids) for c in self.choices))
        self._outputs = self._merged(time.perf_counter())

    def outputs(self) -> AsyncIterator[tuple[Choice, RequestOutput, list[Delta]]]:
        """Every choice's outputs as they come, with the deltas each one completes."""
        return self._outputs

    async def release(self) -> None:
        """Abort what is still running (a finished sequence is a no-op) and give back admission."""
        await self._outputs.aclose()
        for i in self.ids:
            self.engine.abort(i)
        self.admission.release(len(self.choices))

    async def _merged(self, arrived: float):
        queue: asyncio.Queue = asyncio.Queue()
        metrics = self.metrics

        async def pump(choice: Choice, stream):
            last = None
            try:
                async for out in stream:
                    now = time.perf_counter()
                    if out.token_ids:
                        (metrics.ttft.observe(now - arrived) if last is None else metrics.itl.observe(now - last))
                        last = now
                        metrics.generation_tokens.inc(len(out.token_ids))
                    await queue.put((choice, out, choice.absorb(out)))
            except BaseException as e:
                await queue.put(e)
                raise
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(self.choices, self._streams)]
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
            for s in self._streams:
                await s.aclose()

