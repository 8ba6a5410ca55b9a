"""The OpenAI-compatible routes against OpenAI's published spec (openai/openai-openapi; the
schemas our answers are checked against live in tests/data, see tests/helpers/openai_spec.py):
real answers of a real server on 127.0.0.1 validate against its component schemas, request
bodies the spec allows and whose meaning is clear are served, and schemathesis fuzzes the
server with the OpenAPI document it serves itself."""
from __future__ import annotations

import json
import os

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("jsonschema")

from smollm3_triton import Runtime  # noqa: E402
from tests.helpers.openai_spec import errors, event_schema  # noqa: E402
from tests.helpers.serve_util import ScriptedRunner, running_server, tiny_folder  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_folder(tmp_path_factory.mktemp("conformance"), "llama")
    with running_server(lambda: Runtime.load(folder, device="cpu", max_seq_len=256)) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server[0] + path, json=body, timeout=60)


def sse_data(r: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def conforms(name: str, instance) -> None:
    problems = errors(name, instance)
    assert not problems, f"{name}: {problems[:5]}\n{json.dumps(instance)[:2000]}"


# ---------------------------------------------------------------- answers validate against the spec

def test_chat_completion_conforms(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "temperature": 0.8, "seed": 3, "n": 2,
            "logprobs": True, "top_logprobs": 2}
    conforms("CreateChatCompletionRequest", body)
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    conforms("CreateChatCompletionResponse", r.json())
    r = post(server, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    chunks = sse_data(r)
    for chunk in chunks:
        conforms("CreateChatCompletionStreamResponse", chunk)
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_tool_call_answer_conforms(server):
    rt = server[1].state.smollm3.runtime
    real = rt.engine.runner.forward
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    try:
        for stream in (False, True):
            rt.engine.runner.forward = ScriptedRunner(rt.model, rt.tokenizer.encode(text) + [min(rt.eos_ids)])
            body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
                    "stream": stream}
            conforms("CreateChatCompletionRequest", body)
            r = post(server, "/v1/chat/completions", body)
            if stream:
                chunks = sse_data(r)
                for chunk in chunks:
                    conforms("CreateChatCompletionStreamResponse", chunk)
                assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
            else:
                conforms("CreateChatCompletionResponse", r.json())
                call = r.json()["choices"][0]["message"]["tool_calls"][0]
                assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    finally:
        rt.engine.runner.forward = real


def echoed(answer: dict) -> dict:
    """An echo answer with its one deliberate departure from the spec filled in: the first
    prompt token has no logprob, so OpenAI's legacy API (and lm-evaluation-harness, which reads
    it) gives null where the schema says number and object. Nothing else may be null."""
    answer = json.loads(json.dumps(answer))
    for c in answer["choices"]:
        lp = c["logprobs"]
        if lp and lp["tokens"] and lp["token_logprobs"][0] is None:
            assert None not in lp["token_logprobs"][1:] and None not in lp["top_logprobs"][1:]
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return answer


def test_completion_conforms(server):
    body = {"model": "tiny", "prompt": ["Once upon", "A B C"], "max_tokens": 4, "temperature": 0, "logprobs": 2}
    for extra in ({}, {"echo": True}):
        conforms("CreateCompletionRequest", {**body, **extra})
        r = post(server, "/v1/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        conforms("CreateCompletionResponse", echoed(r.json()))
        chunks = sse_data(post(server, "/v1/completions", {**body, **extra, "stream": True}))
        # The spec has no chunk schema for completions: a chunk is a CreateCompletionResponse
        # whose finish_reason is null until the choice's last one, as OpenAI streams them.
        finals = sorted(c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"])
        assert finals == [0, 1]
        for chunk in chunks:
            for c in chunk["choices"]:
                c["finish_reason"] = c["finish_reason"] or "length"
            conforms("CreateCompletionResponse", echoed(chunk))


def test_models_and_errors_conform(server):
    conforms("ListModelsResponse", httpx.get(server[0] + "/v1/models").json())
    conforms("Model", httpx.get(server[0] + "/v1/models/tiny").json())
    missing = httpx.get(server[0] + "/v1/models/gpt-4o")
    assert missing.status_code == 404
    conforms("ErrorResponse", missing.json())
    for body, status in [({"messages": MESSAGES, "temperature": "hot"}, 400),
                         ({"model": "gpt-4o", "messages": MESSAGES}, 404)]:
        r = post(server, "/v1/chat/completions", body)
        assert r.status_code == status
        conforms("ErrorResponse", r.json())
        assert r.json()["error"]["code"] is None or isinstance(r.json()["error"]["code"], str)


def test_responses_conform(server):
    body = {"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            "instructions": "Be brief.", "max_output_tokens": 6, "temperature": 0}
    r = post(server, "/v1/responses", body)
    assert r.status_code == 200, r.text
    conforms("Response", r.json())
    assert r.json()["status"] == "incomplete" and r.json()["incomplete_details"] == {"reason": "max_output_tokens"}
    r = post(server, "/v1/responses", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        conforms(event_schema(e["type"]), e)
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["output"][0]["content"][0]["text"] == \
        r_text(post(server, "/v1/responses", body))
    err = post(server, "/v1/responses", {"input": "x", "previous_response_id": "resp_1"})
    assert err.status_code == 400 and err.json()["error"]["param"] == "previous_response_id"
    conforms("ErrorResponse", err.json())


def r_text(r: httpx.Response) -> str:
    return "".join(p["text"] for item in r.json()["output"] if item["type"] == "message" for p in item["content"])


# ---------------------------------------------------------------- what the spec allows is served

def _text(r: httpx.Response, kind: str = "chat") -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if kind == "chat" else c["text"]


def test_integral_floats_and_seeds(server):
    """Bodies the spec accepts (checked against it first), served with the meaning they have."""
    base = {"model": "tiny", "messages": MESSAGES, "temperature": 1.0}
    floats = {**base, "seed": 181170.0, "max_tokens": 6.0, "n": 1.0}
    ints = {**base, "seed": 181170, "max_tokens": 6, "n": 1}
    for body in (floats, ints):
        conforms("CreateChatCompletionRequest", body)
    assert _text(post(server, "/v1/chat/completions", floats)) == _text(post(server, "/v1/chat/completions", ints))
    lp = {"model": "tiny", "prompt": "Once upon", "max_tokens": 2, "temperature": 0}
    a = post(server, "/v1/completions", {**lp, "logprobs": 3.0})
    b = post(server, "/v1/completions", {**lp, "logprobs": 3})
    conforms("CreateCompletionRequest", {**lp, "logprobs": 3.0})
    assert a.status_code == 200 and a.json()["choices"][0]["logprobs"] == b.json()["choices"][0]["logprobs"]
    # seed -1: a fresh random seed each time (llama.cpp's convention), not a 400
    random = {**base, "seed": -1, "max_tokens": 12}
    conforms("CreateChatCompletionRequest", random)
    texts = {_text(post(server, "/v1/chat/completions", random)) for _ in range(3)}
    assert len(texts) > 1
    # another negative seed is a seed like any other: reproducible
    neg = {**base, "seed": -7, "max_tokens": 8}
    assert _text(post(server, "/v1/chat/completions", neg)) == _text(post(server, "/v1/chat/completions", neg))


@pytest.mark.parametrize("best_of,n,ok", [(0, 1, True), (1, 1, True), (2, 2, True), (1, 3, True), (3, 1, False),
                                          (2, 3, False), (20, 20, True), (21, 21, False)])
def test_best_of_and_n_edges(server, best_of, n, ok):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1, "best_of": best_of, "n": n}
    spec_valid = not errors("CreateCompletionRequest", body)
    r = post(server, "/v1/completions", body)
    if ok:
        assert spec_valid and r.status_code == 200 and len(r.json()["choices"]) == n, r.text
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", r.text


def test_n_up_to_the_spec_maximum(server):
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "n": 128})
    assert r.status_code == 200 and len(r.json()["choices"]) == 128
    r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "n": 129})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


@pytest.mark.parametrize("path,field,value", [("/v1/chat/completions", "logit_bias", {"50": -100}),
                                              ("/v1/completions", "logit_bias", {"50": 5}),
                                              ("/v1/completions", "suffix", "The end.")])
def test_what_we_cannot_do_is_refused_by_name(server, path, field, value):
    body = {"model": "tiny", "messages": MESSAGES, "prompt": "Hi", "max_tokens": 2, field: value}
    r = post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_echo_with_max_tokens_0_scores_the_prompt_alone(server, client):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    assert r.usage.completion_tokens == 0 and r.choices[0].text == "The quick brown fox"
    assert r.usage.total_tokens == r.usage.prompt_tokens
    assert len(r.choices[0].logprobs.tokens) == r.usage.prompt_tokens
    conforms("CreateCompletionResponse", echoed(r.model_dump(exclude_unset=True)))


def test_continuous_usage_stats(server):
    """vLLM's stream_options.continuous_usage_stats (guidellm asks for it): every chunk carries
    the usage so far, ending at the non-streamed answer's."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = sse_data(post(server, "/v1/chat/completions", body))
    whole = post(server, "/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"] for c in chunks)
    assert counts == sorted(counts) and counts[-1] == whole["usage"]["completion_tokens"] == 6
    for chunk in chunks:
        conforms("CreateChatCompletionStreamResponse", chunk)
    text = sse_data(post(server, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True,
                                                     "stream_options": {"continuous_usage_stats": True}}))
    assert [c["usage"]["completion_tokens"] for c in text] == [1, 2, 3]


# ---------------------------------------------------------------- our own document, fuzzed

def test_served_openapi_document_fuzzed_with_schemathesis(tmp_path):
    """schemathesis generates bodies from /openapi.json (the document the server serves) for
    every operation; each answer must be documented (status, content type) and match the
    documented schema, and nothing may be a 500. A 64-token context keeps every generation short."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    folder = tiny_folder(tmp_path, "llama")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    examples = int(os.environ.get("FUZZ_EXAMPLES", 12))
    failures, statuses = [], []
    with running_server(lambda: Runtime.load(folder, device="cpu", max_seq_len=64)) as (base, _):
        schema = schemathesis.openapi.from_url(base + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            # No shrinking: a failure is reported as found (shrinking one costs minutes here).
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy())
            def check(case):
                response = case.call(base_url=base, timeout=120)
                statuses.append((operation.label, response.status_code))
                case.validate_response(response, checks=checks)

            try:
                check()
            except Exception as e:            # collected per operation, reported together
                failures.append(f"{operation.label}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    ok = {label for label, status in statuses if status == 200}
    print(f"schemathesis: {len(statuses)} requests, operations answered 200: {sorted(ok)}")
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages", "POST /v1/responses"} <= ok
