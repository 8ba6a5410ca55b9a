"""The OpenAI API's request bodies, checked field by field, and its error shape.

A request body is untrusted JSON: every field the server reads is type- and range-checked
here, and a bad one is an `APIError` naming it (`param`), answered as OpenAI answers:
`{"error": {"message", "type", "param", "code"}}`. Fields we do not implement but that
would change the result if ignored (logit_bias, suffix) are refused; fields that only
describe the caller (user, metadata) are ignored.

Structured output comes in any of the shapes clients send, each parsed into one
StructuredOutputs: OpenAI's `response_format`, vLLM's `structured_outputs` ({json | regex |
choice | grammar | structural_tag | json_object}) and llama-server's `json_schema` and
`grammar` (GBNF) fields. Whether the schema, regex or grammar compiles is checked later,
by the pipeline, before any compute.

Liberal where OpenAI's published schema is and the meaning is clear: an integer field takes
an integral float (`seed: 181170.0`, `logprobs: 5.0`); `seed: -1` asks for a random seed
(llama.cpp's convention) and any other 64-bit seed is reduced to our seed range, still
reproducible; `n` goes to the spec's 128 (admission bounds what runs at once); `best_of` up to
`n` is served (nothing to rank), more is refused.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from ...errors import FieldError
from ...sampling_params import MAX_LOGPROBS, STRUCTURED_KINDS, SamplingParams, StructuredOutputs
from ..errors import APIError, bad

MAX_N = 128                # choices per request (OpenAI's maximum; admission bounds what runs at once)
MAX_STOP = 16              # stop strings per request
ROLES = ("system", "developer", "user", "assistant", "tool")


def _field(body: dict, name: str, kinds, default=None, *, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(name, f"must be {what}, got {value!r}"[:300])
    return value


def integral(value):
    """An integral float as the int it is (JSON writers send 5.0 for 5); anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(body: dict, name: str, default=None, *, low: int | None = None, high: int | None = None):
    value = _field({name: integral(body.get(name))}, name, (numbers.Integral,), default, what="an integer")
    if value is not None and (low is not None and value < low or high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise bad(name, f"must be {rule}, got {value!r}")
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    return _field(body, name, (bool,), default, what="true or false")


@dataclass(frozen=True)
class Common:
    """What chat and completion requests share."""
    model: str | None
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool          # stream_options.continuous_usage_stats (vLLM): usage on every chunk
    params: SamplingParams          # max_new_tokens: the request's, or the server's default
    max_tokens: int | None          # as asked (None: up to the context)


@dataclass(frozen=True)
class ChatRequest(Common):
    messages: list
    tools: list | None
    tool_choice: str | dict          # "none" | "auto" | "required" | {"type": "function", ...}
    thinking: bool | None
    template_kwargs: dict
    logprobs: bool
    top_logprobs: int
    parallel_tool_calls: bool


@dataclass(frozen=True)
class CompletionRequest(Common):
    prompts: list                    # each a string or a list of token ids
    echo: bool
    logprobs: int | None


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos")
# The library's argument names as this API calls them.
API_NAMES = {"max_new_tokens": "max_tokens", "thinking": "chat_template_kwargs.enable_thinking",
             "thinking_budget": "thinking_token_budget"}
RESPONSES_NAMES = {"max_new_tokens": "max_output_tokens", "thinking": "reasoning.effort", "prompt": "input",
                   "messages": "input", "thinking_budget": "thinking_token_budget"}
# A thinking budget's field: vLLM's name, then llama-server's.
BUDGET_FIELDS = ("thinking_token_budget", "thinking_budget_tokens")


def seed_of(value):
    """A request's seed as SamplingParams takes it: -1 (or null) is a random seed, any other
    64-bit integer a reproducible one (a negative one taken modulo 2**63)."""
    value = integral(value)
    if value is None or value == -1:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and -2**63 <= value < 2**64:
        return int(value) % 2**63
    return value                    # refused by SamplingParams, naming the field


def sampling_params(body: dict, max_tokens: int | None, *, logprobs: int | None, prompt_logprobs: int | None,
                    default_max_tokens: int) -> SamplingParams:
    for name in ("logit_bias",):
        if body.get(name):
            raise bad(name, "is not supported by this server")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    fields = {k: integral(body[k]) for k in _SAMPLING_FIELDS if body.get(k) is not None}
    if "seed" in fields:
        fields["seed"] = seed_of(fields["seed"])
    if isinstance(fields.get("stop_token_ids"), list):
        fields["stop_token_ids"] = [integral(t) for t in fields["stop_token_ids"]]
    budget = thinking_budget(body)
    if budget is not None:
        fields["thinking_budget"] = budget
    fields.setdefault("temperature", 1.0)          # the API's default, not the library's
    if fields.get("top_k") == -1:                  # vLLM's "off"
        fields["top_k"] = 0
    try:
        return SamplingParams(max_new_tokens=max_tokens or default_max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, structured_outputs=structured_outputs(body),
                              **fields)
    except FieldError as e:
        param = API_NAMES.get(e.param, e.param)
        raise APIError(400, e.renamed(param), param=param) from None


def thinking_budget(body: dict) -> int | None:
    """The thinking budget, under vLLM's or llama-server's name (-1: none, as llama-server)."""
    given = {name: _int(body, name, low=-1) for name in BUDGET_FIELDS if body.get(name) is not None}
    if len(set(given.values())) > 1:
        raise bad(BUDGET_FIELDS[1], f"disagrees with {BUDGET_FIELDS[0]}: give one thinking budget")
    value = next(iter(given.values()), None)
    return None if value == -1 else value


def thinking_of(body: dict, kwargs: dict) -> bool | None:
    """Thinking on or off: chat_template_kwargs.enable_thinking, or reasoning_effort ("none"
    turns it off, any other effort on); None leaves the template's default."""
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is not None and not isinstance(thinking, bool):
        raise bad("chat_template_kwargs.enable_thinking", f"must be true or false, got {thinking!r}")
    effort = body.get("reasoning_effort")
    if effort is None:
        return thinking
    if effort not in REASONING_EFFORTS:
        raise bad("reasoning_effort", f"must be one of {list(REASONING_EFFORTS)}, got {effort!r}"[:300])
    if thinking is not None and thinking != (effort != "none"):
        raise bad("reasoning_effort", f"{effort!r} disagrees with chat_template_kwargs.enable_thinking={thinking}")
    return effort != "none"


# OpenAI's efforts; for SmolLM3 "none" means no thinking and any other value thinking on.
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def structured_outputs(body: dict) -> StructuredOutputs | None:
    """The one output constraint of a request, whichever field gave it (FieldError naming it)."""
    fmt = body.get("response_format")
    given = [name for name in ("response_format", "structured_outputs", "json_schema", "grammar")
             if body.get(name) is not None and not (name == "response_format" and isinstance(fmt, dict)
                                                     and fmt.get("type") == "text")]
    if len(given) > 1:
        raise FieldError(given[1], f"cannot be combined with {given[0]}: a request takes one output constraint")
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name == "response_format":
        return StructuredOutputs.from_response_format(value)
    if name == "json_schema":
        return StructuredOutputs(json=value, param=name)
    if name == "grammar":
        return StructuredOutputs(grammar=value, param=name)
    if not isinstance(value, dict):
        raise FieldError(name, f"must be an object with one of {list(STRUCTURED_KINDS)}, got {value!r}"[:300])
    unknown = sorted(set(value) - {*STRUCTURED_KINDS, "json_object"})
    if unknown:
        raise FieldError(name, f"has keys this server does not support: {unknown}")
    spec = {k: v for k, v in value.items() if v is not None and v is not False}
    if spec.pop("json_object", None) is True:
        spec.setdefault("json", {"type": "object"})
    if len(spec) != 1:
        raise FieldError(name, f"must set exactly one of {list(STRUCTURED_KINDS) + ['json_object']}, got "
                               f"{sorted(spec) or 'none'}")
    (kind, v), = spec.items()
    return StructuredOutputs(**{kind: v}, param=f"{name}.{kind}")


def _common(body: dict, max_tokens: int | None, *, logprobs: int | None, prompt_logprobs: int | None,
            default_max_tokens: int, **extra) -> dict:
    model = _field(body, "model", (str,), what="a string")
    n = _int(body, "n", 1, low=1, high=MAX_N)
    stream = _bool(body, "stream")
    options = _field(body, "stream_options", (dict,), {}, what="an object")
    if options and not stream:
        raise bad("stream_options", "is only allowed when stream is true")
    include_usage = _bool(options, "include_usage")
    continuous = _bool(options, "continuous_usage_stats")
    params = sampling_params(body, max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                             default_max_tokens=default_max_tokens)
    return dict(model=model, n=n, stream=stream, include_usage=include_usage, continuous_usage=continuous,
                params=params, max_tokens=max_tokens, **extra)


def _max_tokens(body: dict, *names: str, low: int = 1) -> int | None:
    """The first of names that is set (each one checked)."""
    values = [v for v in (_int(body, name, low=low) for name in names) if v is not None]
    return values[0] if values else None


def parse_chat(body: dict, default_max_tokens: int) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of messages")
    checked = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object with 'role' and 'content', got {m!r}"[:300])
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"must be one of {list(ROLES)}, got {role!r}"[:300])
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise bad(f"{where}.content", "is required")
        if content is not None and not isinstance(content, (str, list)):
            raise bad(f"{where}.content", f"must be a string or a list of content parts, got {type(content).__name__}")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise bad(f"{where}.content[{j}]", "must be an object with a 'type'")
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise bad(f"{where}.tool_calls", "must be a list")
        checked.append({**m, "role": "system" if role == "developer" else role})

    tools = _field(body, "tools", (list,), what="a list of tools")
    names = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", f"must be a JSON schema object, got {fn['parameters']!r}"[:300])
        names.append(fn["name"])
    tool_choice = body.get("tool_choice") or ("auto" if tools else "none")
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or fn.get("name") not in names:
            raise bad("tool_choice", f"must name one of the request's tools {names}, got {tool_choice!r}"[:300])
    elif tool_choice not in ("none", "auto", "required"):
        raise bad("tool_choice", f'must be "none", "auto", "required" or a named function, got {tool_choice!r}'[:300])
    elif tool_choice != "none" and not tools:
        raise bad("tool_choice", f"is {tool_choice!r} but the request has no tools")

    kwargs = _field(body, "chat_template_kwargs", (dict,), {}, what="an object")
    kwargs = dict(kwargs)
    for reserved in ("messages", "tools", "xml_tools", "add_generation_prompt"):
        if reserved in kwargs:
            raise bad(f"chat_template_kwargs.{reserved}", "is set by the server, not the request")
    thinking = thinking_of(body, kwargs)

    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", low=0, high=MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    return ChatRequest(**_common(body, max_tokens, logprobs=(top or 0) if logprobs else None, prompt_logprobs=None,
                                 default_max_tokens=default_max_tokens),
                       messages=checked, tools=tools, tool_choice=tool_choice, thinking=thinking,
                       template_kwargs=kwargs, logprobs=logprobs, top_logprobs=top or 0,
                       parallel_tool_calls=_bool(body, "parallel_tool_calls", True))


def parse_completion(body: dict, default_max_tokens: int) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")
    if any(p == "" for p in prompts):
        raise bad("prompt", "is empty")
    for name in ("suffix",):
        if body.get(name):
            raise bad(name, "is not supported by this server")
    echo = _bool(body, "echo")
    logprobs = _int(body, "logprobs", low=0, high=MAX_LOGPROBS)
    best_of = _int(body, "best_of", low=0, high=20)
    n = _int(body, "n", 1, low=1, high=MAX_N)
    if best_of is not None and best_of > 1 and best_of != n:
        raise bad("best_of", f"must be >= n ({n}), and this server returns every candidate: best_of {best_of} > n "
                             f"would need a ranking it does not do" if best_of > n else f"must be >= n ({n})")
    # max_tokens 0 with echo scores the prompt alone (the legacy API's log-likelihood call).
    max_tokens = _max_tokens(body, "max_tokens", low=0 if echo else 1)
    req = _common(body, max_tokens if max_tokens != 0 else 1, logprobs=logprobs,
                  prompt_logprobs=logprobs if echo and logprobs is not None else None,
                  default_max_tokens=default_max_tokens)
    return CompletionRequest(**{**req, "max_tokens": max_tokens}, prompts=prompts, echo=echo, logprobs=logprobs)


def _token_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value)
