"""The Anthropic Messages API's request bodies, checked field by field and turned into the
pipeline's ChatInput (messages in OpenAI chat shape, tools as OpenAI functions).

    system (string or text blocks)          -> a system message
    user blocks: text, image (base64)       -> content parts (text, image_url with a data: URL)
                 tool_result                -> a "tool" message (before the turn's other content)
    assistant blocks: text, thinking,       -> content, reasoning_content, tool_calls
                      tool_use, redacted_thinking (dropped: we cannot read it)
    tools [{name, description, input_schema}] -> functions; tool_choice auto / any / tool / none
    thinking enabled (budget_tokens) / adaptive / disabled; absent: off, as the API defines it
    output_config.format (json_schema)      -> the structured-output constraint

A bad field is an APIError naming it by its path in the body (`messages[1].content[0].type`),
answered in Anthropic's error shape by the app. Fields that only describe the caller
(metadata, service_tier) are ignored; output_config.effort is checked and has no effect (the
model has no effort control); what we cannot do and would change the answer (server tools,
MCP servers, containers, images by URL) is refused.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass

from ...errors import FieldError
from ...sampling_params import SamplingParams, StructuredOutputs
from ..errors import APIError, bad
from ..openai.protocol import MAX_STOP, integral
from ..pipeline import ChatInput

# The library's argument names as this API calls them.
API_NAMES = {"max_new_tokens": "max_tokens", "thinking": "thinking", "prompt": "messages",
             "stop": "stop_sequences", "thinking_budget": "thinking.budget_tokens"}
EFFORTS = ("low", "medium", "high", "max")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_REFUSED = ("mcp_servers", "container")


@dataclass(frozen=True)
class MessagesRequest:
    model: str | None
    stream: bool
    chat: ChatInput


def parse_messages(body: dict) -> MessagesRequest:
    """A /v1/messages body; max_tokens is required, as the API requires it."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad("max_tokens", "is required")
    max_tokens = integral(max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise bad("max_tokens", f"must be an integer >= 1, got {max_tokens!r}"[:300])
    for name in _REFUSED:
        if body.get(name):
            raise bad(name, "is not supported by this server")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}"[:300])
    return MessagesRequest(_model(body), stream, chat_input(body, int(max_tokens)))


def parse_count_tokens(body: dict) -> tuple[str | None, ChatInput]:
    """A /v1/messages/count_tokens body: a messages body without max_tokens."""
    return _model(body), chat_input(body, 1)


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {model!r}"[:300])
    return model


def chat_input(body: dict, max_tokens: int) -> ChatInput:
    messages = system_messages(body.get("system")) + conversation(body.get("messages"))
    tools, tool_params = _tools(body.get("tools"))
    tool_choice, parallel = _tool_choice(body.get("tool_choice"), tools)
    thinking, budget = _thinking(body.get("thinking"), max_tokens)
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP):
        raise bad("stop_sequences", f"must be a list of at most {MAX_STOP} strings, got {stop!r}"[:300])
    fields = {"temperature": body.get("temperature"), "top_p": body.get("top_p"),
              "top_k": integral(body.get("top_k")), "stop": stop}
    fields = {k: v for k, v in fields.items() if v is not None}
    fields.setdefault("temperature", 1.0)          # the API's default
    try:
        params = SamplingParams(max_new_tokens=max_tokens, thinking_budget=budget,
                                structured_outputs=_output_format(body.get("output_config")), **fields)
    except FieldError as e:
        param = API_NAMES.get(e.param, e.param)
        raise APIError(400, e.renamed(param), param=param) from None
    return ChatInput(messages, params, tools=tools, tool_choice=tool_choice, thinking=thinking,
                     tool_params=tool_params, parallel_tool_calls=parallel)


def system_messages(system) -> list[dict]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if not isinstance(system, list):
        raise bad("system", f"must be a string or a list of text blocks, got {type(system).__name__}")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad(f"system[{i}]", 'must be a text block {"type": "text", "text": ...}')
        texts.append(block["text"])
    return [{"role": "system", "content": "\n".join(texts)}] if texts else []


def conversation(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    out: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object with 'role' and 'content', got {m!r}"[:300])
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise bad(f"{where}.role", f'must be "user" or "assistant", got {role!r}'[:300])
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content", "must be a string or a list of content blocks")
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise bad(f"{where}.content[{j}]", "must be an object with a 'type'")
        out += _user(content, where) if role == "user" else [_assistant(content, where)]
    return out


def _text(block: dict, where: str) -> str:
    if not isinstance(block.get("text"), str):
        raise bad(f"{where}.text", "must be a string")
    return block["text"]


def _image(block: dict, where: str) -> dict:
    source = block.get("source")
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise bad(f"{where}.source", 'must be {"type": "base64", "media_type": ..., "data": ...}: images are '
                                     "not fetched by URL")
    media, data = source.get("media_type"), source.get("data")
    if not isinstance(media, str) or not media.startswith("image/") or not isinstance(data, str):
        raise bad(f"{where}.source", "needs a media_type (image/png, image/jpeg, ...) and base64 data")
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _user(content: list, where: str) -> list[dict]:
    """A user turn's blocks: tool results become tool messages, the rest one user message."""
    tools, parts = [], []
    for j, block in enumerate(content):
        at, kind = f"{where}.content[{j}]", block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(f"{at}.tool_use_id", "must be a string")
            tools.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                          "content": _tool_result_text(block.get("content", ""), f"{at}.content")})
        else:
            raise bad(f"{at}.type", f'must be "text", "image" or "tool_result" in a user message, got {kind!r}'[:300])
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _tool_result_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "must be a string or a list of text blocks")
    texts = []
    for k, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"{where}[{k}]", "must be a text block (a tool result carries text here)")
        texts.append(_text(block, f"{where}[{k}]"))
    return "\n".join(texts)


def _assistant(content: list, where: str) -> dict:
    texts, thoughts, calls = [], [], []
    for j, block in enumerate(content):
        at, kind = f"{where}.content[{j}]", block["type"]
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise bad(f"{at}.thinking", "must be a string")
            thoughts.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input"), dict):
                raise bad(at, "a tool_use block needs an id, a name and an input object")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}})
        else:
            raise bad(f"{at}.type", f'must be "text", "thinking", "redacted_thinking" or "tool_use" in an '
                                    f"assistant message, got {kind!r}"[:300])
    message = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if thoughts:
        message["reasoning_content"] = "\n".join(thoughts)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools) -> tuple[list[dict] | None, tuple[str, ...] | None]:
    if tools is None:
        return None, None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(where, "must be an object with a name and an input_schema")
        if tool.get("type") not in (None, "custom"):
            raise bad(f"{where}.type", f"{tool['type']!r}: server tools are not supported by this server; "
                                       "give client tools (name, description, input_schema)"[:300])
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise bad(f"{where}.name", f"must match {_TOOL_NAME.pattern}, got {name!r}"[:300])
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise bad(f"{where}.input_schema", f'must be a JSON schema with "type": "object", got {schema!r}'[:300])
        fn = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out or None, tuple(f"tools[{i}].input_schema" for i in range(len(out))) or None


def _tool_choice(choice, tools: list[dict] | None) -> tuple[str | dict, bool]:
    """-> (the pipeline's tool_choice, whether several calls may come)."""
    if choice is None:
        return ("auto" if tools else "none"), True
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice", f'must be {{"type": "auto" | "any" | "tool" | "none"}}, got {choice!r}'[:300])
    parallel = choice.get("disable_parallel_tool_use", False)
    if not isinstance(parallel, bool):
        raise bad("tool_choice.disable_parallel_tool_use", "must be true or false")
    kind = choice["type"]
    if kind == "none":
        return "none", True
    names = [t["function"]["name"] for t in tools or []]
    if not names:
        raise bad("tool_choice", f"is {kind!r} but the request has no tools")
    if kind == "tool":
        if choice.get("name") not in names:
            raise bad("tool_choice.name", f"must name one of the request's tools {names}, got "
                                          f"{choice.get('name')!r}"[:300])
        return {"type": "function", "function": {"name": choice["name"]}}, not parallel
    return ("required" if kind == "any" else "auto"), not parallel


def _thinking(thinking, max_tokens: int) -> tuple[bool, int | None]:
    """-> (thinking on, its budget). Absent: off, as the API defines it."""
    if thinking is None:
        return False, None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False, None
    if kind == "adaptive":
        return True, None
    if kind != "enabled":
        raise bad("thinking.type", f'must be "enabled", "adaptive" or "disabled", got {kind!r}'[:300])
    budget = integral(thinking.get("budget_tokens"))
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or not 0 <= budget < max_tokens:
        raise bad("thinking.budget_tokens", f"must be an integer >= 0 and less than max_tokens ({max_tokens}), "
                                            f"got {budget!r}"[:300])
    return True, int(budget)


def _output_format(config) -> StructuredOutputs | None:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise bad("output_config", f"must be an object, got {config!r}"[:300])
    effort = config.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise bad("output_config.effort", f"must be one of {list(EFFORTS)}, got {effort!r}"[:300])
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format", f'must be {{"type": "json_schema", "schema": {{...}}}}, got {fmt!r}'[:300])
    return StructuredOutputs(json=fmt["schema"], param="output_config.format.schema")
