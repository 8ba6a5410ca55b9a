"""Chat template rendering and reasoning/answer splitting.

Templates come from model files (GGUF `tokenizer.chat_template`, tokenizer_config.json,
chat_template.jinja) and are untrusted code: they run in jinja2's immutable sandbox,
set up the way transformers' `apply_chat_template` sets it up so that a template
renders here exactly as it does there.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FieldError, RequestError

__all__ = ["render_chat", "split_reasoning", "THINK_OPEN", "THINK_CLOSE"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Names a message's reasoning comes under, the one most templates read first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by SmolLM3's template to mark the
    assistant's tokens for training masks): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # A template may store attributes on a namespace; refusing dunder/underscore names
    # keeps it from reaching interpreter internals through them.
    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template may not set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ' which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    thinking: bool | None = None,
    tools: list | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with a chat template into the prompt string.

    thinking: passed as `enable_thinking` when given; None leaves the template's default
    (SmolLM3: on). A `/think` or `/no_think` in SmolLM3's system prompt wins over it.
    tools: passed both as `tools` (the transformers convention) and as `xml_tools` (what
    SmolLM3's template reads), unless `xml_tools` is given explicitly in `extra`.
    extra: any other template variables (bos_token, python_tools, custom_instructions...).
    """
    if not isinstance(template, str) or not template:
        raise RequestError("render_chat needs a non-empty chat template string; this model file carries none")
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"messages should be a list of dicts, got {type(messages).__name__}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f"messages[{i}] should be a dict with a 'role', got {message!r}")
        # Templates handle a missing key but often print a None value as "None".
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            # Templates read the reasoning under different names; give it under each.
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    if thinking and "enable_thinking" not in template:
        raise FieldError("thinking", "is on, but this model's chat template has no thinking mode (it never reads "
                                     "enable_thinking)")
    variables = dict(extra)
    if thinking is not None:
        variables["enable_thinking"] = bool(thinking)
    if tools is not None:
        variables.setdefault("xml_tools", tools)
    # transformers always defines `documents` (None when absent); templates may test it.
    variables.setdefault("documents", None)
    try:
        return _compile(template).render(
            messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as exc:
        raise RequestError(f"chat template failed: {exc}") from exc


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split generated text into (reasoning, answer).

    - ``<think>R</think>A`` -> (R stripped, A without leading whitespace); an empty
      block gives reasoning "".
    - ``<think>R`` with no closing tag yet (streaming, or cut off) -> (R, "").
    - ``R</think>A`` (the prompt already opened the block) -> (R, A).
    - no tags -> (None, text).
    """
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE)
    if start >= 0 and (end < 0 or start < end) and not text[:start].strip():
        body = text[start + len(THINK_OPEN):]
        end = body.find(THINK_CLOSE)
        if end < 0:
            return body.strip(), ""
        return body[:end].strip(), body[end + len(THINK_CLOSE):].lstrip()
    if end >= 0:
        return text[:end].strip(), text[end + len(THINK_CLOSE):].lstrip()
    return None, text
