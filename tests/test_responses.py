"""The OpenAI Responses API of `smollm3 serve` (POST /v1/responses), as its clients use it: the
real `openai` SDK's `responses.create` (plain and streamed) and `responses.stream()` against a
server on 127.0.0.1. The real SmolLM2-135M for text; a random SmolLM3 with the official template
and a scripted output for reasoning items, function_call round trips and thinking off. Oracles:
the same request through Chat Completions, transformers' rendering of the template (prompt
lengths), json.loads of the scripted arguments."""
from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from smollm3_triton import Runtime  # noqa: E402
from tests.helpers.serve_util import (  # noqa: E402
    SMOLLM3_TEMPLATE,
    ScriptedRunner,
    hf_prompt_len,
    metrics_once_idle,
    running_server,
    tiny_folder,
)

INSTRUCTIONS = "You are a helpful assistant."
QUESTION = "Name three colours."
TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}
CHAT_TOOL = {"type": "function", "function": {k: TOOL[k] for k in ("name", "description", "parameters")}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2_client(smollm2_path):
    # The exact fp32 torch path: a request's output does not depend on its batch.
    load = lambda: Runtime.load(smollm2_path, device="cpu", backend="torch", max_seq_len=1024)  # noqa: E731
    with running_server(load, served_model_name="smollm2") as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smollm3_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("responses3"), "smollm3", template=SMOLLM3_TEMPLATE)


@pytest.fixture(scope="module")
def server3(smollm3_folder):
    with running_server(lambda: Runtime.load(smollm3_folder, device="cpu", max_seq_len=2048, kv_cache_tokens=8192),
                        served_model_name="smollm3") as (base, app):
        yield base, app, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def scripted(server3):
    """Make the next request's model output this text (then <|im_end|>)."""
    rt = server3[1].state.smollm3.runtime
    real = rt.engine.runner.forward

    def script(text: str):
        rt.engine.runner.forward = ScriptedRunner(rt.model, rt.tokenizer.encode(text) +
                                                  [rt.tokenizer.token_to_id("<|im_end|>")])

    yield script
    rt.engine.runner.forward = real


# ---------------------------------------------------------------- text, real SmolLM2

def test_plain_streamed_and_chat_agree(smollm2_client):
    """responses.create plain, streamed (create(stream=True)) and through the SDK's stream()
    helper: the same greedy text as Chat Completions, events numbered 0..n-1 in the API's order."""
    client = smollm2_client
    kwargs = dict(model="smollm2", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=20, temperature=0)
    plain = client.responses.create(**kwargs)
    chat = client.chat.completions.create(model="smollm2", max_tokens=20, temperature=0, messages=[
        {"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}])
    text = chat.choices[0].message.content
    assert len(text) > 10 and plain.output_text == text
    assert plain.usage.input_tokens == chat.usage.prompt_tokens
    assert plain.usage.output_tokens == chat.usage.completion_tokens
    assert plain.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert plain.id.startswith("resp_") and plain.model == "smollm2" and plain.store is False
    assert [item.type for item in plain.output] == ["message"]

    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{plain.status}"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == text
    assert events[-1].response.output_text == text and events[-1].response.usage.output_tokens == \
        plain.usage.output_tokens

    with client.responses.stream(**kwargs) as stream:
        pieces = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(pieces) == final.output_text == text


# ---------------------------------------------------------------- reasoning and tools: scripted SmolLM3

THOUGHT = "<think>\nStep one.\nStep two.\n</think>\n\nThe answer."


def test_reasoning_item_and_thinking_off(server3, scripted, smollm3_folder):
    client = server3[2]
    scripted(THOUGHT)
    r = client.responses.create(model="smollm3", input=ASK, max_output_tokens=100, reasoning={"effort": "high"},
                                temperature=0)
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Step one.\nStep two." and r.output_text == "The answer."
    assert r.usage.output_tokens_details.reasoning_tokens > 0
    assert r.usage.input_tokens == hf_prompt_len(smollm3_folder, ASK, enable_thinking=True)
    scripted(THOUGHT)
    events = list(client.responses.create(model="smollm3", input=ASK, max_output_tokens=100,
                                          reasoning={"effort": "high"}, temperature=0, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Step one.\nStep two."
    assert [item.model_dump(exclude={"id"}) for item in events[-1].response.output] == \
        [item.model_dump(exclude={"id"}) for item in r.output]
    scripted("Just the answer.")
    off = client.responses.create(model="smollm3", input=ASK, max_output_tokens=20, reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"] and off.output_text == "Just the answer."
    assert off.usage.input_tokens == hf_prompt_len(smollm3_folder, ASK, enable_thinking=False)


CALL = ('<think>\nThe user wants weather.\n</think>\nLet me check.\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>')


def test_function_call_round_trip(server3, scripted, smollm3_folder):
    client = server3[2]
    kwargs = dict(model="smollm3", input=ASK, tools=[TOOL], max_output_tokens=120, reasoning={"effort": "high"},
                  temperature=0)
    scripted(CALL)
    r = client.responses.create(**kwargs)
    assert [item.type for item in r.output] == ["reasoning", "message", "function_call"]
    call = r.output[2]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "Paris"}
    assert r.output_text == "Let me check.\n" and r.status == "completed"      # the text before the call, as written
    assert r.usage.input_tokens == hf_prompt_len(smollm3_folder, ASK, xml_tools=[CHAT_TOOL], enable_thinking=True)
    # Streamed: the arguments arrive in pieces, and .done carries them whole.
    scripted(CALL)
    events = list(client.responses.create(**kwargs, stream=True))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(pieces) > 1 and "".join(pieces) == done.arguments and json.loads(done.arguments) == {"location": "Paris"}
    # Second turn: the output items go back as input, with the function's output.
    history = ASK + [item.model_dump(exclude_none=True) for item in r.output] + \
        [{"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    scripted("<think>\n\n</think>\nIt is 18 C and sunny in Paris.")
    reply = client.responses.create(**{**kwargs, "input": history})
    assert reply.output_text == "It is 18 C and sunny in Paris."
    # What the template saw: the call as the text the model wrote (the template renders no
    # tool_calls), its reasoning, and the tool's answer; transformers renders the same.
    as_chat = ASK + [{"role": "assistant", "content": 'Let me check.\n<tool_call>\n{"name": "get_weather", '
                                                      '"arguments": {"location": "Paris"}}\n</tool_call>',
                      "reasoning_content": "The user wants weather."},
                     {"role": "tool", "content": "18 C, sunny"}]
    assert reply.usage.input_tokens == hf_prompt_len(smollm3_folder, as_chat, xml_tools=[CHAT_TOOL],
                                                     enable_thinking=True)


def test_json_schema_format(server3, scripted):
    """text.format json_schema goes through the structured-output layer: an output that fits
    the schema passes its mask and comes back as output_text; a schema that is not one is a 400
    naming text.format.schema (below)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    scripted('{"n": 7}')
    r = server3[2].responses.create(model="smollm3", input=ASK, max_output_tokens=20, reasoning={"effort": "none"},
                                    text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    assert json.loads(r.output_text) == {"n": 7}


# ---------------------------------------------------------------- refusals in OpenAI's shape

USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body,param", [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_audio", "data": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "computer_call_output", "call_id": "a"}]}, "input[0].type"),
    ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "message", "role": "user", "content": [
        {"type": "input_image", "image_url": "http://example.com/a.png"}]}]}, "input[0].content[0].image_url"),
    ({"input": USER, "tools": [{"type": "function", "name": "f", "parameters": "x"}]}, "tools[0].parameters"),
    ({"input": USER, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}]}, "tools[0].parameters"),
    ({"input": USER, "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": USER, "tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": USER, "tool_choice": "required"}, "tool_choice"),
    ({"input": USER, "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": USER, "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": USER, "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": USER, "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ({"input": USER, "temperature": "hot"}, "temperature"),
    ({"input": USER, "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": USER, "conversation": "conv_1"}, "conversation"),
    ({"input": USER, "background": True}, "background"),
])
def test_malformed_bodies_are_400_in_openai_shape(server3, body, param):
    r = httpx.post(server3[0] + "/v1/responses", json={"model": "smollm3", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"].startswith(param), err
    assert "Traceback" not in r.text


def test_sdk_raises_the_matching_errors(server3):
    client = server3[2]
    with pytest.raises(openai.BadRequestError, match="stateless"):
        client.responses.create(model="smollm3", input="Hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError, match="gpt-5"):
        client.responses.create(model="gpt-5", input="Hi")


# ---------------------------------------------------------------- cancellation

def test_disconnect_mid_stream_frees_the_sequence(smollm3_folder):
    with running_server(lambda: Runtime.load(smollm3_folder, device="cpu", max_seq_len=1024, kv_cache_tokens=4096),
                        served_model_name="smollm3") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        with client.responses.stream(model="smollm3", input="Hi", max_output_tokens=500) as stream:
            for n, _ in enumerate(stream):
                if n == 6:
                    break                                    # leaving the block closes the connection
        metrics_once_idle(base, within_s=20)
