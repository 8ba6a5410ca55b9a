"""Structured output through `smollm3 serve`, as clients use it: the real `openai` client and
httpx against a server on 127.0.0.1 running the real SmolLM2-135M-Instruct (and a random
SmolLM3 for thinking). Oracles: pydantic and jsonschema (the outputs validate), Python's re,
the same request run alone (unconstrained outputs bitwise equal), /metrics (nothing leaked).
"""
from __future__ import annotations

import asyncio
import enum
import json
import re
import time
from typing import Annotated, Optional

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from pydantic import BaseModel, Field  # noqa: E402

from smollm3_triton import Runtime  # noqa: E402
from tests.helpers.serve_util import SMOLLM3_TEMPLATE, ScriptedRunner, metric, running_server, tiny_folder  # noqa: E402


@pytest.fixture(scope="module")
def server(smollm2_path):
    # The exact fp32 torch path: a request's output does not depend on its batch.
    load = lambda: Runtime.load(smollm2_path, device="cpu", backend="torch", max_seq_len=1024, max_num_seqs=16)  # noqa: E731
    with running_server(load, served_model_name="smollm2") as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=300)


def aclient(server):
    return openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- the openai client's parse()

class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


Short = Annotated[str, Field(max_length=20)]


class Address(BaseModel):
    city: Short
    country: Short


class Person(BaseModel):
    name: Annotated[str, Field(max_length=30)]
    age: int = Field(ge=0, le=120)
    favourite_colour: Colour
    hobbies: list[Short] = Field(max_length=3)
    address: Address
    nickname: Optional[Short] = None


PEOPLE = ["a painter who lives in Paris", "a retired sailor from Lisbon", "a young chess champion in Oslo",
          "a baker in Naples who loves opera", "an astronaut training in Houston", "a beekeeper in rural Wales",
          "a jazz pianist in New Orleans", "a marathon runner from Nairobi", "a librarian in Kyoto",
          "a surfer who teaches maths in Sydney"]


def test_parse_with_a_pydantic_model_ten_prompts(server):
    """chat.completions.parse(response_format=Person): nested object, list, enum, optional
    field, integer range; 10 prompts at once, every answer parses and validates."""

    async def main():
        client = aclient(server)
        return await asyncio.gather(*[client.chat.completions.parse(
            model="smollm2", messages=ask(f"Describe {who} as a person record."), response_format=Person,
            temperature=0, max_tokens=300) for who in PEOPLE])

    schema = Person.model_json_schema()
    for who, r in zip(PEOPLE, asyncio.run(main())):
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "stop", (who, message.content)
        assert isinstance(message.parsed, Person)
        jsonschema.validate(json.loads(message.content), schema)


def test_length_inside_the_object_says_so(client):
    """Cut off inside the object: finish_reason "length" with the text so far (a prefix that
    no JSON parser accepts yet), and parse() says why it cannot parse."""
    r = client.chat.completions.create(model="smollm2", messages=ask("A person record, please."), max_tokens=6,
                                       temperature=0, response_format={"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": Person.model_json_schema()}})
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "length" and content.startswith('{"name"')   # the schema's first key
    with pytest.raises(ValueError):
        json.loads(content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="smollm2", messages=ask("A person record, please."), max_tokens=6,
                                      temperature=0, response_format=Person)


# ---------------------------------------------------------------- the other request shapes

def test_json_object(client):
    r = client.chat.completions.create(model="smollm2", messages=ask("Give me a JSON object about a cat."),
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"


def test_structured_outputs_regex_date(client):
    r = client.chat.completions.create(model="smollm2", messages=ask("When did the Apollo 11 mission land?"),
                                       temperature=0, max_tokens=20, extra_body={"structured_outputs": {"regex": DATE}})
    assert re.fullmatch(DATE, r.choices[0].message.content), r.choices[0].message.content


def test_structured_outputs_choice(client):
    choices = ["positive", "negative", "neutral"]
    for review in ("I loved this film, wonderful!", "Terrible food and rude staff."):
        r = client.chat.completions.create(model="smollm2", messages=ask(f"Sentiment of: {review}"), temperature=0,
                                           max_tokens=10, extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices


GBNF = '''root ::= "The capital is " name "."
name ::= [A-Z] [a-z]+ (" " [A-Z] [a-z]+)?'''


def test_llama_server_grammar_and_json_schema(client):
    r = client.chat.completions.create(model="smollm2", messages=ask("What is the capital of France?"),
                                       temperature=0, max_tokens=20, extra_body={"grammar": GBNF})
    assert re.fullmatch(r"The capital is [A-Z][a-z]+( [A-Z][a-z]+)?\.", r.choices[0].message.content)
    schema = {"type": "object", "properties": {
        "capital": {"type": "string", "maxLength": 20},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 2000}},
              "required": ["capital", "population_millions"], "additionalProperties": False}
    r = client.chat.completions.create(model="smollm2", messages=ask("France's capital and its population?"),
                                       temperature=0, max_tokens=60, extra_body={"json_schema": schema})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_completions_endpoint_takes_a_constraint(client):
    r = client.completions.create(model="smollm2", prompt="The first moon landing was on", temperature=0,
                                  max_tokens=20, extra_body={"structured_outputs": {"regex": " " + DATE}})
    assert re.fullmatch(" " + DATE, r.choices[0].text)


# ---------------------------------------------------------------- tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "strict": True, "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
FORECAST = ask("What will the weather be in Berlin for the next three days?")


def test_strict_named_tool_call_validates(client):
    r = client.chat.completions.create(model="smollm2", messages=FORECAST, tools=TOOLS, temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    (call,) = c.message.tool_calls
    assert c.finish_reason == "tool_calls" and c.message.content is None and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_streamed_tool_arguments_join_to_the_non_streamed(client):
    """tool_choice "required": the call's name comes first, then its arguments in several
    pieces, which join to exactly the non-streamed arguments."""
    kwargs = dict(model="smollm2", messages=FORECAST, tools=TOOLS, tool_choice="required", temperature=0,
                  max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    pieces = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert pieces[0].function.name == whole[0].function.name and pieces[0].id
    args = [p.function.arguments for p in pieces[1:] if p.index == 0 and p.function.arguments]
    assert len(args) > 3 and "".join(args) == whole[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---------------------------------------------------------------- many at once

SCHEMAS = [{"type": "object", "properties": {key: kind}, "required": [key], "additionalProperties": False}
           for key, kind in [("colour", {"enum": ["red", "green", "blue"]}),
                             ("count", {"type": "integer", "minimum": 0, "maximum": 999}),
                             ("ok", {"type": "boolean"}), ("word", {"type": "string", "maxLength": 12}),
                             ("score", {"enum": [1.5, 2.5, 10]}),
                             ("tags", {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}),
                             ("when", {"type": "string", "pattern": DATE}),
                             ("pet", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
                                      "required": ["name"], "additionalProperties": False})]]


def test_16_concurrent_half_constrained(server, client):
    """16 requests at once, 8 under 8 different schemas and 8 free: every constrained answer
    validates, every free answer (text and logprobs) is bitwise the same request's alone."""
    topics = ["the sea", "a red bicycle", "winter mornings", "a lost key", "the moon", "old trains", "tea", "rain"]

    def free(i):
        return dict(model="smollm2", messages=ask(f"Write a line about {topics[i]}."), temperature=0.9, seed=i,
                    max_tokens=16, logprobs=True)

    def constrained(i):
        return dict(model="smollm2", messages=ask(f"Answer as JSON about {topics[i]}."), temperature=0.9, seed=i,
                    max_tokens=60, response_format={"type": "json_schema",
                                                    "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]}})

    async def main():
        client = aclient(server)
        return await asyncio.gather(*[client.chat.completions.create(**(constrained(i // 2) if i % 2 else free(i // 2)))
                                      for i in range(16)])

    together = asyncio.run(main())
    for i, r in enumerate(together):
        if i % 2:
            assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[i // 2])
        else:
            alone = client.chat.completions.create(**free(i // 2))
            assert r.choices[0].message.content == alone.choices[0].message.content
            assert [t.logprob for t in r.choices[0].logprobs.content] == \
                [t.logprob for t in alone.choices[0].logprobs.content]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/Nowhere"}}}}}},
     "response_format.json_schema.schema", "Nowhere"),
    ({"structured_outputs": {"regex": "([0-9]{4}"}}, "structured_outputs.regex", "parenthesis"),
    ({"grammar": 'root ::= "a" |'}, "grammar", "EBNF"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"json_schema": {"type": "object"}, "grammar": 'root ::= "a"'}, "grammar", "cannot be combined"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}], "tool_choice": "required"}, "tools[0].function.parameters", "nonsense"),
])
def test_bad_constraints_are_400_naming_the_field(server, extra, param, reason):
    body = {"model": "smollm2", "messages": ask("hi"), "max_tokens": 4, **extra}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and reason in error["message"] and error["type"] == "invalid_request_error"


def test_too_expensive_schema_is_refused_not_waited_for(server):
    rt = server[1].state.smollm3.runtime
    slow = {"type": "object", "required": [f"p{i}" for i in range(120)],
            "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{3,8}@[a-z]{2,9}\\.(net|org)"}
                           for i in range(120)}}
    before, rt.engine.grammars.timeout = rt.engine.grammars.timeout, 0.3
    try:
        start = time.monotonic()
        r = httpx.post(server[0] + "/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "messages": ask("hi"), "max_tokens": 4, "json_schema": slow})
        assert time.monotonic() - start < 10
    finally:
        rt.engine.grammars.timeout = before
    assert r.status_code == 400 and r.json()["error"]["param"] == "json_schema"
    assert "did not compile within 0.3 s" in r.json()["error"]["message"]


def test_nothing_leaked_after_refusals(server, client):
    """After every test above: nothing runs, every KV block is free."""
    client.chat.completions.create(model="smollm2", messages=ask("hi"), max_tokens=2, temperature=0,
                                   extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    m = httpx.get(server[0] + "/metrics").text
    assert metric(m, "smollm3:num_requests_running") == 0
    assert metric(m, "smollm3:kv_cache_blocks_free") == metric(m, "smollm3:kv_cache_blocks_total")


# ---------------------------------------------------------------- a reasoning model

@pytest.fixture(scope="module")
def smollm3_server(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("so3"), "smollm3", template=SMOLLM3_TEMPLATE)
    with running_server(lambda: Runtime.load(folder, device="cpu", backend="torch", max_seq_len=2048),
                        served_model_name="smollm3") as (base, app):
        yield base, app


ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "confidence": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["answer", "confidence"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_smollm3_thinking_free_then_constrained(smollm3_server, stream):
    """Thinking on (SmolLM3's template): the scripted reasoning, which no JSON grammar would
    allow, comes back whole as reasoning; the content after </think> is forced into the
    schema although the script goes on in prose."""
    base, app = smollm3_server
    rt = app.state.smollm3.runtime
    reasoning = "Hmm {{ not JSON }} at all"
    real = rt.engine.runner.forward
    rt.engine.runner.forward = ScriptedRunner(rt.model, rt.tokenizer.encode(
        f"<think>\n{reasoning}\n</think>\nWell, I would say yes."))
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        r = client.chat.completions.create(model="smollm3", messages=ask("Is it raining?"), temperature=0,
                                           max_tokens=80, stream=stream, response_format={
                                               "type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}})
        if stream:
            deltas = [c.choices[0].delta for c in r if c.choices]
            thought = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
        else:
            thought, content = r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content
    finally:
        rt.engine.runner.forward = real
    assert thought == reasoning
    jsonschema.validate(json.loads(content), ANSWER)


CITY = {"type": "object", "properties": {"location": {"enum": ["Paris", "Oslo"]}}, "required": ["location"],
        "additionalProperties": False}
STRICT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": CITY}}]


@pytest.mark.parametrize("tool_choice, script", [
    ("auto", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Lyon"}}\n</tool_call>'),
    ("required", "I would rather not call anything."),
])
def test_tool_calls_are_constrained_once_begun_or_forced(smollm3_server, tool_choice, script):
    """auto: free text, then the call the model begins is held to the strict tool's schema
    (the script's "Lyon" is not allowed); required: a model that will not call is made to."""
    base, app = smollm3_server
    rt = app.state.smollm3.runtime
    real = rt.engine.runner.forward
    rt.engine.runner.forward = ScriptedRunner(rt.model, rt.tokenizer.encode(script))
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        r = client.chat.completions.create(model="smollm3", messages=ask("Weather?"), tools=STRICT_TOOLS,
                                           tool_choice=tool_choice, temperature=0, max_tokens=80,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    finally:
        rt.engine.runner.forward = real
    c = r.choices[0]
    (call,) = c.message.tool_calls
    assert c.finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    if tool_choice == "auto":         # the text before the call was free
        assert c.message.content.startswith("Let me check.\n")
