"""A chat model's text as the OpenAI message fields: reasoning, content and tool calls.

SmolLM3 writes its thinking as `<think>...</think>` before the answer, and tool calls
Hermes-style, each as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
possibly several, with text around them that is content. `ChatTextParser` splits the
text as it streams in: a tail that could still grow into one of those tags is held
back until the next piece shows what it is, so a tag never leaks into content.

A call comes out as a "tool_call" delta (id and name) followed by "tool_arguments" deltas
whose texts join into its arguments: once the call's head `{"name": "...", "arguments": `
has come, the arguments object streams piece by piece as the model writes it (as vLLM and
llama-server stream them); a call written any other way comes whole when it closes.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .chat import THINK_CLOSE, THINK_OPEN

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str          # a JSON object, as the OpenAI API carries it: a string

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Delta:
    kind: str               # "reasoning" | "content" | "tool_call" (id, name) | "tool_arguments" (a piece)
    text: str = ""
    call: ToolCall | None = None


def tool_calls(deltas: list[Delta]) -> list[ToolCall]:
    """The calls that deltas describe, each with its argument pieces joined."""
    calls: list[ToolCall] = []
    for d in deltas:
        if d.kind == "tool_call":
            calls.append(d.call)
        elif d.kind == "tool_arguments":
            last = calls[-1]
            calls[-1] = ToolCall(last.id, last.name, last.arguments + d.text)
    return calls


def _call_deltas(call: ToolCall) -> list[Delta]:
    return [Delta("tool_call", call=ToolCall(call.id, call.name, "")), Delta("tool_arguments", call.arguments)]


# The head of a call whose arguments object can stream: `<tool_call>{"name": "x", "arguments": `
# (or "parameters"), followed by the object's `{`.
_CALL_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,'
                        r'\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def parse_tool_call(body: str) -> ToolCall | None:
    """The JSON between the tags -> a ToolCall; None if it is not {"name": str, "arguments": ...}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):           # some models write the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"],
                    arguments=json.dumps(args, ensure_ascii=False))


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ChatTextParser:
    """push(text) -> the deltas it completes; finish() -> whatever was held back.

    in_reasoning: the prompt itself opened a think block (the template ended with
    `<think>`). parse_tools: look for tool calls (a request that offered tools).
    """

    def __init__(self, *, in_reasoning: bool = False, parse_tools: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.thought = in_reasoning         # a think block was opened (reasoning may be "")
        self.lead = False                   # strip the whitespace after <think> or </think>
        self.parse_tools = parse_tools
        self.buffer = ""
        self._depth, self._in_string, self._escaped = 0, False, False   # inside a streaming arguments object

    def push(self, text: str) -> list[Delta]:
        self.buffer += text
        out: list[Delta] = []
        while True:
            progressed = getattr(self, f"_{self.state}")(out)
            if not progressed:
                return [d for d in out if d.text or d.call]

    def finish(self) -> list[Delta]:
        out = self.push("")
        rest, self.buffer = self.buffer, ""
        if self.state == "call":
            call = parse_tool_call(rest[len(CALL_OPEN):])
            out += _call_deltas(call) if call else [Delta("content", rest)]
        elif self.state in ("arguments", "call_tail"):
            pass                            # cut off inside the call: its arguments so far stay
        elif rest:
            out.append(Delta("reasoning" if self.state == "reasoning" else "content", rest))
        return [d for d in out if d.text or d.call]

    def _strip_lead(self) -> bool:
        """False while all that came after a tag is whitespace."""
        if self.lead:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return False
            self.lead = False
        return True

    # Each state consumes what it can from the buffer; True if it changed state.
    def _start(self, out: list[Delta]) -> bool:
        head = self.buffer.lstrip()
        if head.startswith(THINK_OPEN):
            self.buffer = head[len(THINK_OPEN):]
            self.state, self.thought, self.lead = "reasoning", True, True
            return True
        if THINK_OPEN.startswith(head):
            return False                    # not yet known whether a think block opens
        self.state = "content"
        return True

    def _reasoning(self, out: list[Delta]) -> bool:
        if not self._strip_lead():
            return False
        end = self.buffer.find(THINK_CLOSE)
        if end >= 0:
            out.append(Delta("reasoning", self.buffer[:end].rstrip("\n")))
            self.buffer = self.buffer[end + len(THINK_CLOSE):]
            self.state, self.lead = "content", True
            return True
        keep = _partial_tag(self.buffer, THINK_CLOSE)
        # Newlines before a possible close tag are held too: they belong to the tag's line.
        cut = len(self.buffer) - keep
        while cut > 0 and self.buffer[cut - 1] == "\n":
            cut -= 1
        out.append(Delta("reasoning", self.buffer[:cut]))
        self.buffer = self.buffer[cut:]
        return False

    def _content(self, out: list[Delta]) -> bool:
        if not self._strip_lead():
            return False
        if self.parse_tools:
            start = self.buffer.find(CALL_OPEN)
            if start >= 0:
                out.append(Delta("content", self.buffer[:start]))
                self.buffer = self.buffer[start:]
                self.state = "call"
                return True
            keep = _partial_tag(self.buffer, CALL_OPEN)
        else:
            keep = 0
        cut = len(self.buffer) - keep
        out.append(Delta("content", self.buffer[:cut]))
        self.buffer = self.buffer[cut:]
        return False

    def _call(self, out: list[Delta]) -> bool:
        head = _CALL_HEAD.match(self.buffer)
        end = self.buffer.find(CALL_CLOSE)
        if head and (end < 0 or head.end() < end):
            try:
                name = json.loads(head.group(1))
            except ValueError:
                name = ""
            if name:
                out.append(Delta("tool_call", call=ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, "")))
                self.buffer = self.buffer[head.end():]
                self.state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
                return True
        if end < 0:
            return False
        body = self.buffer[len(CALL_OPEN):end]
        call = parse_tool_call(body)
        # Text that only looks like a call stays content, tags and all.
        out += _call_deltas(call) if call else [Delta("content", self.buffer[:end + len(CALL_CLOSE)])]
        self.buffer = self.buffer[end + len(CALL_CLOSE):]
        self.state = "content"
        return True

    def _arguments(self, out: list[Delta]) -> bool:
        """The arguments object, passed on as it comes, up to its closing brace."""
        for i, ch in enumerate(self.buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    out.append(Delta("tool_arguments", self.buffer[:i + 1]))
                    self.buffer = self.buffer[i + 1:]
                    self.state = "call_tail"
                    return True
        out.append(Delta("tool_arguments", self.buffer))
        self.buffer = ""
        return False

    def _call_tail(self, out: list[Delta]) -> bool:
        """After the arguments: the rest of the call object, up to the closing tag, dropped."""
        end = self.buffer.find(CALL_CLOSE)
        if end < 0:
            return False
        self.buffer = self.buffer[end + len(CALL_CLOSE):]
        self.state = "content"
        return True


def tool_calls_as_text(message: dict) -> dict:
    """An assistant message's earlier `tool_calls` written into its content the way the
    model writes them, for templates (SmolLM3's) that do not render tool_calls."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parts = [message["content"]] if isinstance(message.get("content"), str) and message["content"] else []
    for call in calls:
        fn = call.get("function", {}) if isinstance(call, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        parts.append(f"{CALL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}"
                     f"\n{CALL_CLOSE}")
    # One newline between the parts, as the model writes them (text that ends a line gets no second one).
    text = "".join(p if not i or parts[i - 1].endswith("\n") else "\n" + p for i, p in enumerate(parts))
    return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": text}
