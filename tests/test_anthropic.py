"""The Anthropic Messages API of `smollm3 serve`, as its clients use it: the real `anthropic`
SDK (sync, async, `messages.stream()` and `get_final_message()`) and httpx against a server on
127.0.0.1. The real SmolLM2-135M for text; a random SmolLM3 with the official template and a
scripted output for thinking blocks, tool use and the thinking budget. Oracles: the same prompt
through the OpenAI chat and Responses APIs, transformers' rendering of the template, the
tokenizer's decoding of the scripted tokens, Python's str.find for stop sequences."""
from __future__ import annotations

import asyncio
import json

import pytest

anthropic = pytest.importorskip("anthropic")
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

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_path):
    # The exact fp32 torch path: a request's output does not depend on its batch.
    load = lambda: Runtime.load(smollm2_path, device="cpu", backend="torch", max_seq_len=1024)  # noqa: E731
    with running_server(load, served_model_name="smollm2") as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def sdk(smollm2_server):
    return anthropic.Anthropic(base_url=smollm2_server[0], api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def smollm3_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("anthropic3"), "smollm3", template=SMOLLM3_TEMPLATE)


@pytest.fixture(scope="module")
def server3(smollm3_folder):
    with running_server(lambda: Runtime.load(smollm3_folder, device="cpu", max_seq_len=2048),
                        served_model_name="smollm3") as (base, app):
        yield base, app, anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)


@pytest.fixture
def scripted(server3):
    """Make the next request's model output these token ids (a text, or ids)."""
    rt = server3[1].state.smollm3.runtime
    real = rt.engine.runner.forward

    def script(output):
        ids = rt.tokenizer.encode(output) + [rt.tokenizer.token_to_id("<|im_end|>")] if isinstance(output, str) \
            else output
        rt.engine.runner.forward = ScriptedRunner(rt.model, ids)

    yield script
    rt.engine.runner.forward = real


def blocks(message) -> list[tuple]:
    """(type, text) of each block: the stream helper's ParsedTextBlock and a TextBlock compare equal."""
    return [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None) or getattr(b, "input", None))
            for b in message.content]


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# ---------------------------------------------------------------- text, real SmolLM2

def test_three_apis_give_the_same_greedy_text(smollm2_server, sdk):
    """One prompt through Messages, Chat Completions and Responses: the same greedy text, the
    same prompt length (count_tokens too), the same stop for running out of tokens."""
    base = smollm2_server[0]
    oa = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
    msg = sdk.messages.create(model="smollm2", max_tokens=24, system=SYSTEM, extra_body={"temperature": 0},
                              messages=[{"role": "user", "content": QUESTION}])
    chat = oa.chat.completions.create(model="smollm2", max_tokens=24, temperature=0,
                                      messages=[{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": QUESTION}])
    resp = oa.responses.create(model="smollm2", max_output_tokens=24, temperature=0, instructions=SYSTEM,
                               input=QUESTION)
    text = chat.choices[0].message.content
    print(f"greedy answer: {text!r}")
    assert len(text) > 10 and text_of(msg) == text == resp.output_text
    prompt = chat.usage.prompt_tokens
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == prompt == resp.usage.input_tokens
    counted = sdk.messages.count_tokens(model="smollm2", system=SYSTEM, messages=[{"role": "user", "content": QUESTION}])
    assert counted.input_tokens == prompt
    assert msg.usage.output_tokens == chat.usage.completion_tokens == resp.usage.output_tokens
    finish = chat.choices[0].finish_reason
    assert (msg.stop_reason, resp.status) == (("max_tokens", "incomplete") if finish == "length" else
                                              ("end_turn", "completed"))


def test_async_and_streamed_equal_the_plain_message(smollm2_server, sdk):
    kwargs = dict(model="smollm2", max_tokens=16, system=SYSTEM, messages=[{"role": "user", "content": QUESTION}],
                  extra_body={"temperature": 0})
    plain = sdk.messages.create(**kwargs)

    async def run_async():
        client = anthropic.AsyncAnthropic(base_url=smollm2_server[0], api_key="x", max_retries=0, timeout=300)
        try:
            return await client.messages.create(**kwargs)
        finally:
            await client.close()

    assert text_of(asyncio.run(run_async())) == text_of(plain)
    with sdk.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(final) == text_of(plain)
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens
    assert final.id.startswith("msg_") and final.model == "smollm2" and final.role == "assistant"


def test_stream_event_sequence(smollm2_server):
    body = {"model": "smollm2", "max_tokens": 6, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": QUESTION}]}
    with httpx.stream("POST", smollm2_server[0] + "/v1/messages", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in data]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert data[0]["message"]["content"] == [] and data[-2]["delta"]["stop_reason"] == "max_tokens"
    assert data[-2]["usage"]["output_tokens"] == 6


def test_stop_sequence_names_the_string(sdk):
    kwargs = dict(model="smollm2", max_tokens=24, messages=[{"role": "user", "content": QUESTION}],
                  extra_body={"temperature": 0})
    free = text_of(sdk.messages.create(**kwargs))
    stop = free.split()[2]                           # the third word, wherever it first appears
    cut = sdk.messages.create(**kwargs, stop_sequences=["never written", stop])
    assert text_of(cut) == free[:free.find(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


# ---------------------------------------------------------------- thinking, tools, budget: scripted SmolLM3

THOUGHT = "<think>\nStep one.\nStep two.\n</think>\n\nThe answer."


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 500}, {"type": "adaptive"}])
def test_thinking_blocks(server3, scripted, smollm3_folder, thinking):
    client = server3[2]
    scripted(THOUGHT)
    msg = client.messages.create(model="smollm3", max_tokens=600, messages=ASK, thinking=thinking,
                                 extra_body={"temperature": 0})
    assert blocks(msg) == [("thinking", "Step one.\nStep two."), ("text", "The answer.")]
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == hf_prompt_len(smollm3_folder, ASK,
                                                                                       enable_thinking=True)
    scripted(THOUGHT)
    with client.messages.stream(model="smollm3", max_tokens=600, messages=ASK, thinking=thinking,
                                extra_body={"temperature": 0}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    thought = "".join(e.delta.thinking for e in events if e.type == "content_block_delta"
                      and e.delta.type == "thinking_delta")
    assert thought == "Step one.\nStep two." and blocks(final) == blocks(msg)


@pytest.mark.parametrize("thinking", [None, {"type": "disabled"}])
def test_thinking_off_by_default(server3, scripted, smollm3_folder, thinking):
    scripted("Just the answer.")
    extra = {"thinking": thinking} if thinking else {}
    msg = server3[2].messages.create(model="smollm3", max_tokens=20, messages=ASK, **extra)
    assert [b.type for b in msg.content] == ["text"] and text_of(msg) == "Just the answer."
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == hf_prompt_len(smollm3_folder, ASK,
                                                                                       enable_thinking=False)


CALL = ('<think>\nThe user wants weather.\n</think>\nLet me check.\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>')


def test_tool_use_round_trip(server3, scripted, smollm3_folder):
    client = server3[2]
    scripted(CALL)
    msg = client.messages.create(model="smollm3", max_tokens=120, messages=ASK, tools=TOOLS,
                                 thinking={"type": "adaptive"}, extra_body={"temperature": 0})
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"] and msg.stop_reason == "tool_use"
    use = msg.content[2]
    assert use.name == "get_weather" and use.input == {"location": "Paris"} and use.id.startswith("toolu_")
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == \
        hf_prompt_len(smollm3_folder, ASK, xml_tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "Weather of a city", "parameters": TOOLS[0]["input_schema"]}}],
            enable_thinking=True)
    # The streamed call: its input arrives as input_json_delta pieces that the SDK joins.
    scripted(CALL)
    with client.messages.stream(model="smollm3", max_tokens=120, messages=ASK, tools=TOOLS,
                                thinking={"type": "adaptive"}, extra_body={"temperature": 0}) as stream:
        pieces = [e.delta.partial_json for e in stream if e.type == "content_block_delta"
                  and e.delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"location": "Paris"}
    assert final.content[2].input == {"location": "Paris"} and final.stop_reason == "tool_use"
    # Second turn: the assistant's blocks and the tool's result go back, as the SDK sends them.
    history = ASK + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": "18 C, sunny"}]}]
    scripted("<think>\n\n</think>\nIt is 18 C and sunny in Paris.")
    reply = client.messages.create(model="smollm3", max_tokens=40, messages=history, tools=TOOLS,
                                   thinking={"type": "adaptive"}, extra_body={"temperature": 0})
    assert text_of(reply) == "It is 18 C and sunny in Paris." and reply.stop_reason == "end_turn"
    # The template does not render earlier tool calls: they go back as the text the model wrote.
    as_text = ASK + [{"role": "assistant", "content": 'Let me check.\n<tool_call>\n{"name": "get_weather", '
                                                      '"arguments": {"location": "Paris"}}\n</tool_call>',
                      "reasoning_content": "The user wants weather."},
                     {"role": "tool", "content": "18 C, sunny"}]
    counted = client.messages.count_tokens(model="smollm3", messages=history, tools=TOOLS,
                                           thinking={"type": "adaptive"})
    assert counted.input_tokens == hf_prompt_len(smollm3_folder, as_text, enable_thinking=True, xml_tools=[
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": TOOLS[0]["input_schema"]}}])


def test_named_tool_choice_and_parallel_off(server3, scripted):
    """tool_choice {"type": "tool"}: the call is decoded under its schema (the script fits it)."""
    scripted('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n</tool_call>')
    msg = server3[2].messages.create(model="smollm3", max_tokens=60, messages=ASK, tools=TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather",
                                                  "disable_parallel_tool_use": True},
                                     extra_body={"temperature": 0})
    assert [(b.type, b.input) for b in msg.content] == [("tool_use", {"location": "Oslo"})]


@pytest.mark.parametrize("api", ["messages", "chat-vllm", "chat-llama-server", "responses"])
def test_thinking_budget_closes_the_block(server3, scripted, api):
    """The model would think on; after `budget` tokens inside its think block (every token after
    the opening tag, its newline included) the engine writes the closing tag (the tokens of
    "\\n</think>\\n") and the answer follows. The script puts the answer right after as many
    block tokens as budget + the closing tag, so without the budget the answer would land
    inside the reasoning."""
    rt = server3[1].state.smollm3.runtime
    tok = rt.tokenizer
    budget = 5
    close = tok.encode("\n</think>\n")
    opener = tok.encode("<think>\n")
    tag = next(k for k in range(1, len(opener) + 1) if "<think>" in tok.decode(opener[:k]))   # the tag's tokens
    inside = (opener[tag:] + tok.encode("Let me think about this carefully step by step."))[:budget + len(close)]
    answer = tok.encode("Answer is 42.")
    ids = opener[:tag] + inside + answer + [tok.token_to_id("<|im_end|>")]
    scripted(ids)
    base = server3[0]
    if api == "messages":
        body = {"model": "smollm3", "max_tokens": 100, "messages": ASK, "temperature": 0,
                "thinking": {"type": "enabled", "budget_tokens": budget}}
        out = httpx.post(base + "/v1/messages", json=body, timeout=120).json()
        reasoning = "".join(b["thinking"] for b in out["content"] if b["type"] == "thinking")
        content = "".join(b["text"] for b in out["content"] if b["type"] == "text")
        n_out = out["usage"]["output_tokens"]
    elif api.startswith("chat"):
        field = "thinking_token_budget" if api == "chat-vllm" else "thinking_budget_tokens"
        body = {"model": "smollm3", "max_tokens": 100, "messages": ASK, "temperature": 0, field: budget}
        out = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
        reasoning, content = out["choices"][0]["message"]["reasoning_content"], out["choices"][0]["message"]["content"]
        n_out = out["usage"]["completion_tokens"]
    else:
        body = {"model": "smollm3", "max_output_tokens": 100, "input": ASK, "temperature": 0,
                "reasoning": {"effort": "high"}, "thinking_token_budget": budget}
        out = httpx.post(base + "/v1/responses", json=body, timeout=120).json()
        reasoning = "".join(c["text"] for item in out["output"] if item["type"] == "reasoning"
                            for c in item["content"])
        content = "".join(c["text"] for item in out["output"] if item["type"] == "message" for c in item["content"])
        n_out = out["usage"]["output_tokens"]
    assert reasoning == tok.decode(inside[:budget]).strip()
    assert content == "Answer is 42."
    assert n_out == len(ids)            # budget + the forced tag took exactly the block's places


# ---------------------------------------------------------------- refusals in Anthropic's shape

def _anthropic_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert "Traceback" not in r.text
    return body["error"]


USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body,field", [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 0, "messages": USER}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                                                                   "input": {}}]}]}, "messages[0].content[0].type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://example.com/a.png"}}]}]},
     "messages[0].content[0].source"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "f", "input_schema": "x"}]}, "tools[0].input_schema"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "f", "input_schema": {"type": "string"}}]},
     "tools[0].input_schema"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "f", "input_schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}]}, "tools[0].input_schema"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"name": "bad name", "input_schema": {"type": "object"}}]},
     "tools[0].name"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
     "tools[0].type"),
    ({"max_tokens": 5, "messages": USER, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice.name"),
    ({"max_tokens": 5, "messages": USER, "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"max_tokens": 5, "messages": USER, "thinking": {"type": "sometimes"}}, "thinking.type"),
    ({"max_tokens": 5, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 5}},
     "thinking.budget_tokens"),
    ({"max_tokens": 5, "messages": USER, "stop_sequences": "END"}, "stop_sequences"),
    ({"max_tokens": 5, "messages": USER, "temperature": "hot"}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    ({"max_tokens": 5, "messages": USER, "output_config": {"effort": "extreme"}}, "output_config.effort"),
    ({"max_tokens": 5, "messages": USER, "mcp_servers": [{"url": "x"}]}, "mcp_servers"),
    ({"max_tokens": 5, "system": 3, "messages": USER}, "system"),
])
def test_malformed_bodies_are_400_in_anthropic_shape(server3, body, field):
    err = _anthropic_error(httpx.post(server3[0] + "/v1/messages", json={"model": "smollm3", **body}, timeout=60), 400)
    assert err["type"] == "invalid_request_error" and err["message"].startswith(field), err["message"]


def test_sdk_raises_the_matching_errors(server3):
    client = server3[2]
    with pytest.raises(anthropic.BadRequestError, match="tool_choice.name"):
        client.messages.create(model="smollm3", max_tokens=5, messages=USER, tools=TOOLS,
                               tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.NotFoundError, match="claude-opus"):
        client.messages.create(model="claude-opus-4-1", max_tokens=5, messages=USER)
    err = _anthropic_error(httpx.post(server3[0] + "/v1/messages/count_tokens", json={"messages": "x"}), 400)
    assert err["message"].startswith("messages")
    long = [{"role": "user", "content": "word " * 3000}]
    err = _anthropic_error(httpx.post(server3[0] + "/v1/messages", json={"max_tokens": 5, "messages": long}), 400)
    assert "2048" in err["message"] and "max_tokens" in err["message"]


def test_api_key_x_api_key_and_open_metrics(smollm3_folder):
    with running_server(lambda: Runtime.load(smollm3_folder, device="cpu", max_seq_len=1024), api_key="sesame",
                        max_body_bytes=4096, served_model_name="smollm3") as (base, _):
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200         # a Prometheus scraper has no key
        assert httpx.get(base + "/openapi.json").status_code == 200
        err = _anthropic_error(httpx.post(base + "/v1/messages", json={"max_tokens": 2, "messages": USER}), 401)
        assert err["type"] == "authentication_error"
        assert httpx.post(base + "/v1/chat/completions", json={"messages": USER}).json()["error"]["code"] == \
            "invalid_api_key"                                          # OpenAI's shape on its routes
        for path in ("/v1/models", "/v1/models/smollm3", "/tokenize", "/v1/responses", "/v1/messages/count_tokens"):
            assert httpx.post(base + path, json={}).status_code == 401 and httpx.get(base + path).status_code == 401
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
                model="smollm3", max_tokens=2, messages=USER)
        good = anthropic.Anthropic(base_url=base, api_key="sesame", max_retries=0)   # sends x-api-key
        assert good.messages.create(model="smollm3", max_tokens=2, messages=USER).usage.output_tokens == 2
        bearer = openai.OpenAI(base_url=base + "/v1", api_key="sesame", max_retries=0)
        assert bearer.responses.create(model="smollm3", input="Hi", max_output_tokens=2).usage.output_tokens == 2
        err = _anthropic_error(httpx.post(base + "/v1/messages", headers={"x-api-key": "sesame"},
                                          json={"max_tokens": 2, "messages": [{"role": "user", "content": "x" * 5000}]}),
                               413)
        assert err["type"] == "request_too_large" and "4096" in err["message"]


# ---------------------------------------------------------------- cancellation and accounting

def _requests(text: str, endpoint: str, status: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "smollm3:requests_total" and s.labels == {"endpoint": endpoint, "status": status}:
                return s.value
    return 0.0


def test_disconnect_mid_stream_frees_the_sequence_and_metrics_count_each_endpoint(smollm3_folder):
    with running_server(lambda: Runtime.load(smollm3_folder, device="cpu", max_seq_len=1024, kv_cache_tokens=4096),
                        served_model_name="smollm3") as (base, _):
        client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)
        with client.messages.stream(model="smollm3", max_tokens=500, messages=USER) as stream:
            for n, _ in enumerate(stream):
                if n == 4:
                    break                                    # leaving the block closes the connection
        m = metrics_once_idle(base, within_s=20)
        client.messages.count_tokens(model="smollm3", messages=USER)
        httpx.post(base + "/v1/messages", json={"messages": USER})                     # 400
        openai.OpenAI(base_url=base + "/v1", api_key="x").responses.create(model="smollm3", input="Hi",
                                                                           max_output_tokens=2)
        httpx.get(base + "/v1/models/smollm3")
        m = httpx.get(base + "/metrics").text
        for endpoint, status in [("/v1/messages", "200"), ("/v1/messages", "400"), ("/v1/messages/count_tokens", "200"),
                                 ("/v1/responses", "200"), ("/v1/models/{model}", "200")]:
            assert _requests(m, endpoint, status) == 1, (endpoint, status)
