"""The OpenAI Responses API's request bodies (POST /v1/responses), checked field by field and
turned into the pipeline's ChatInput.

    instructions                          -> a system message first
    input: a string                       -> one user message
           items: messages (input_text, input_image with a data: URL, output_text),
                  function_call, function_call_output, reasoning (its text goes with the
                  assistant turn that follows)
    tools [{type: function, name, parameters, strict}], tool_choice, parallel_tool_calls
    text.format (json_schema, json_object) -> the structured-output constraint
    reasoning.effort: "none" turns SmolLM3's thinking off, any other effort on; absent: the
      template's default. A thinking budget under vLLM's or llama-server's body field.

Stateless: nothing is kept, so `previous_response_id`, `conversation` and item references are
refused with a 400 that says to send the whole conversation; `store` is accepted and nothing
is stored (the response says `store: false`). `background`, reusable `prompt`s, hosted tools
and logprobs are refused by name.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from ...errors import FieldError
from ...sampling_params import SamplingParams, StructuredOutputs
from ..errors import APIError, bad
from ..pipeline import ChatInput
from .protocol import REASONING_EFFORTS, RESPONSES_NAMES, integral, thinking_budget

_STATELESS = ("previous_response_id", "conversation")
_REFUSED = ("background", "prompt")


@dataclass(frozen=True)
class ResponsesRequest:
    model: str | None
    stream: bool
    chat: ChatInput
    echo: dict              # the request's settings, as the response object repeats them


def parse_responses(body: dict, default_max_tokens: int) -> ResponsesRequest:
    for name in _STATELESS:
        if body.get(name) is not None:
            raise bad(name, "this server is stateless and keeps no responses or conversations: send the whole "
                            "conversation in input")
    for name in _REFUSED:
        if body.get(name):
            raise bad(name, "is not supported by this server")
    if body.get("top_logprobs"):
        raise bad("top_logprobs", "is not supported by this server")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {model!r}"[:300])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", f"must be true or false, got {stream!r}"[:300])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "must be a string")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _input(body.get("input"))
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", "must be true or false")
    max_tokens = integral(body.get("max_output_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral)
                                   or max_tokens < 1):
        raise bad("max_output_tokens", f"must be an integer >= 1, got {max_tokens!r}"[:300])
    effort, thinking = _reasoning(body.get("reasoning"))
    fmt = _text_format(body.get("text"))
    fields = {k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None}
    fields.setdefault("temperature", 1.0)
    try:
        params = SamplingParams(max_new_tokens=max_tokens or default_max_tokens, thinking_budget=thinking_budget(body),
                                structured_outputs=fmt, **fields)
    except FieldError as e:
        param = RESPONSES_NAMES.get(e.param, e.param)
        raise APIError(400, e.renamed(param), param=param) from None
    chat = ChatInput(messages, params, max_tokens is not None, [{"type": "function", "function": t} for t in tools]
                     or None, tool_choice, thinking, tool_params=tuple(f"tools[{i}].parameters"
                                                                      for i in range(len(tools))) or None,
                     parallel_tool_calls=parallel)
    echo = {"instructions": instructions, "max_output_tokens": max_tokens, "parallel_tool_calls": parallel,
            "temperature": params.temperature, "top_p": params.top_p,
            "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
            "tools": [{"type": "function", "strict": bool(t.get("strict")), **t} for t in tools],
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "reasoning": {"effort": effort, "summary": None},
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {}}
    return ResponsesRequest(model, stream, chat, echo)


def _input(value) -> list[dict]:
    if isinstance(value, str):
        if not value:
            raise bad("input", "is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("input", "must be a string or a non-empty list of input items")
    out: list[dict] = []
    reasoning: list[str] = []              # a reasoning item's text, for the assistant turn after it
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, "must be an input item object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and reasoning:
                message["reasoning_content"], reasoning = "\n".join(reasoning), []
            out.append(message)
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise bad(f"{where}.{name}", "must be a string")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant" and not reasoning:     # the same turn's calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                turn = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    turn["reasoning_content"], reasoning = "\n".join(reasoning), []
                out.append(turn)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad(f"{where}.call_id", "must be a string")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _output_text(item.get("output"), f"{where}.output")})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []     # the text, else its summary
            if not isinstance(parts, list):
                raise bad(f"{where}.content", "must be a list of reasoning_text parts")
            reasoning += [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
        elif kind == "item_reference":
            raise bad(where, "this server is stateless and keeps no items: send the item itself")
        else:
            raise bad(f"{where}.type", f'must be "message", "function_call", "function_call_output" or '
                                       f'"reasoning", got {kind!r}'[:300])
    return out


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad(f"{where}.role", f'must be "user", "system", "developer" or "assistant", got {role!r}'[:300])
    role = "system" if role == "developer" else role
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise bad(f"{at}.text", "must be a string")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith("data:"):
                raise bad(f"{at}.image_url", "must be a data: URL (images are not fetched, and file ids are not "
                                             "kept)")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise bad(f"{at}.type", f"{kind!r} is not a content part this server takes here (input_text, "
                                    f"input_image with a data: URL, output_text)"[:300])
    if role != "user":          # templates take a plain string from the other roles
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _output_text(output, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(p, dict) and p.get("type") == "input_text"
                                        and isinstance(p.get("text"), str) for p in output):
        return "".join(p["text"] for p in output)
    raise bad(where, "must be a string or a list of input_text parts")


def _tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad(f"{where}.type", f'must be "function" (hosted tools are not supported), got {kind!r}'[:300])
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad(f"{where}.name", "must be a non-empty string")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"{where}.parameters", f"must be a JSON schema object, got {params!r}"[:300])
        fn = {"name": tool["name"], "parameters": params or {"type": "object", "properties": {}}}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        if tool.get("strict") is True:
            fn["strict"] = True
        out.append(fn)
    return out


def _tool_choice(choice, tools: list[dict]) -> str | dict:
    names = [t["name"] for t in tools]
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        if choice.get("type") != "function" or choice.get("name") not in names:
            raise bad("tool_choice", f"must name one of the request's function tools {names}, got {choice!r}"[:300])
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice not in ("none", "auto", "required"):
        raise bad("tool_choice", f'must be "none", "auto", "required" or a function, got {choice!r}'[:300])
    if choice != "none" and not tools:
        raise bad("tool_choice", f"is {choice!r} but the request has no tools")
    return choice


def _reasoning(reasoning) -> tuple[str | None, bool | None]:
    """-> (the effort as asked, thinking on/off/template default)."""
    if reasoning is None:
        return None, None
    if not isinstance(reasoning, dict):
        raise bad("reasoning", f"must be an object, got {reasoning!r}"[:300])
    effort = reasoning.get("effort")
    if effort is None:
        return None, None
    if effort not in REASONING_EFFORTS:
        raise bad("reasoning.effort", f"must be one of {list(REASONING_EFFORTS)}, got {effort!r}"[:300])
    return effort, effort != "none"


def _text_format(text) -> StructuredOutputs | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("text", f"must be an object, got {text!r}"[:300])
    fmt = text.get("format")
    if fmt is None or isinstance(fmt, dict) and fmt.get("type") == "text":
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return StructuredOutputs(json={"type": "object"}, param="text.format")
    if kind == "json_schema" and isinstance(fmt.get("schema"), (dict, str)):
        return StructuredOutputs(json=fmt["schema"], param="text.format.schema")
    raise bad("text.format", f'must be {{"type": "text" | "json_object" | "json_schema", ...}} (json_schema with a '
                             f'"schema"), got {fmt!r}'[:300])
