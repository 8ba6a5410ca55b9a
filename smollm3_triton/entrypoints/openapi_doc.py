"""The server's OpenAPI document (/openapi.json, /docs): what each route accepts and returns,
written out here because the routes read their bodies by hand (each API's protocol module
checks them). The request schemas say which fields are read and their types and ranges; a
body they allow may still be refused with a 400 for what a schema cannot say (a prompt over
the context, a grammar that does not compile, fields that exclude each other). Every status a
route answers is listed, with the error shape of its API. tests/test_openai_conformance.py
fuzzes the served document with schemathesis.
"""
from __future__ import annotations

from fastapi import FastAPI

STR, INT, NUM, BOOL, OBJ = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, \
    {"type": "object"}
NULL = {"type": "null"}


def obj(props: dict, *required: str, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(required), **extra}


def arr(items: dict, **extra) -> dict:
    return {"type": "array", "items": items, **extra}


def opt(schema: dict) -> dict:
    return {"anyOf": [schema, NULL]}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def rng(kind: dict, low=None, high=None, **extra) -> dict:
    bounds = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
    return opt({**kind, **bounds, **extra})


INT64 = rng(INT, -2**63, 2**63 - 1)
STOP = opt({"anyOf": [{**STR, "minLength": 1}, arr({**STR, "minLength": 1}, maxItems=16)]})
SAMPLING = {"temperature": rng(NUM, 0), "top_p": rng(NUM, exclusiveMinimum=0, high=1), "top_k": rng(INT, -1),
            "min_p": rng(NUM, 0, 1), "repetition_penalty": rng(NUM, exclusiveMinimum=0),
            "presence_penalty": rng(NUM, -2, 2), "frequency_penalty": rng(NUM, -2, 2), "seed": INT64,
            "stop": STOP, "stop_token_ids": opt(arr({**INT, "minimum": 0})), "ignore_eos": opt(BOOL),
            "logit_bias": opt({**OBJ, "maxProperties": 0}), "model": opt(STR),
            "stream": opt(BOOL), "stream_options": opt(obj({"include_usage": opt(BOOL),
                                                             "continuous_usage_stats": opt(BOOL)})),
            "n": rng(INT, 1, 128), "response_format": opt(OBJ), "structured_outputs": opt(OBJ),
            "json_schema": opt(OBJ), "grammar": opt(STR),
            "thinking_token_budget": rng(INT, -1), "thinking_budget_tokens": rng(INT, -1)}
EFFORT = opt({"enum": ["none", "minimal", "low", "medium", "high", "xhigh"]})
FUNCTION = obj({"name": {**STR, "minLength": 1}, "description": STR, "parameters": OBJ, "strict": opt(BOOL)}, "name")
USAGE = obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT,
             "prompt_tokens_details": obj({"cached_tokens": INT}, "cached_tokens")},
            "prompt_tokens", "completion_tokens", "total_tokens")
TOP = obj({"token": STR, "logprob": NUM, "bytes": arr(INT)}, "token", "logprob", "bytes")
STOP_REASON = {"anyOf": [STR, INT, NULL]}
TOOL_CALL = obj({"id": STR, "type": {"const": "function"}, "function": obj({"name": STR, "arguments": STR},
                                                                            "name", "arguments")},
                "id", "type", "function")

SCHEMAS = {
    "OpenAIError": obj({"error": obj({"message": STR, "type": STR, "param": opt(STR), "code": opt(STR)},
                                     "message", "type", "param", "code")}, "error"),
    "AnthropicError": obj({"type": {"const": "error"}, "error": obj({"type": STR, "message": STR}, "type", "message")},
                          "type", "error"),
    "ChatCompletionRequest": obj({
        **SAMPLING, "messages": arr({"anyOf": [
            obj({"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                 "content": {"anyOf": [STR, arr({"anyOf": [
                     obj({"type": {"const": "text"}, "text": STR}, "type", "text"),
                     obj({"type": {"const": "image_url"}, "image_url": obj({"url": STR}, "url")},
                         "type", "image_url")]})]}, "tool_call_id": STR}, "role", "content"),
            obj({"role": {"const": "assistant"}, "content": opt(STR), "tool_calls": arr(TOOL_CALL, minItems=1)},
                "role", "tool_calls")]}, minItems=1),
        "max_tokens": rng(INT, 1), "max_completion_tokens": rng(INT, 1), "logprobs": opt(BOOL),
        "top_logprobs": rng(INT, 0, 20), "tools": opt(arr(obj({"type": {"const": "function"}, "function": FUNCTION},
                                                              "function"))),
        "tool_choice": opt({"anyOf": [{"enum": ["none", "auto", "required"]},
                                      obj({"type": {"const": "function"}, "function": obj({"name": STR}, "name")},
                                          "type", "function")]}),
        "parallel_tool_calls": opt(BOOL), "chat_template_kwargs": opt(OBJ), "reasoning_effort": EFFORT}, "messages"),
    "ChatCompletion": obj({
        "id": STR, "object": {"const": "chat.completion"}, "created": INT, "model": STR, "usage": USAGE,
        "choices": arr(obj({
            "index": INT, "finish_reason": {"enum": ["stop", "length", "tool_calls"]}, "stop_reason": STOP_REASON,
            "logprobs": opt(obj({"content": arr({**TOP, "properties": {**TOP["properties"],
                                                                       "top_logprobs": arr(TOP)}}),
                                 "refusal": NULL}, "content", "refusal")),
            "message": obj({"role": {"const": "assistant"}, "content": opt(STR), "refusal": NULL,
                            "reasoning_content": STR, "reasoning": STR, "tool_calls": arr(TOOL_CALL)},
                           "role", "content")}, "index", "message", "finish_reason", "logprobs"))},
        "id", "object", "created", "model", "choices", "usage"),
    "CompletionRequest": obj({
        **SAMPLING, "prompt": {"anyOf": [{**STR, "minLength": 1}, arr({**INT, "minimum": 0}, minItems=1),
                                         arr({"anyOf": [{**STR, "minLength": 1}, arr({**INT, "minimum": 0},
                                                                                      minItems=1)]}, minItems=1)]},
        "max_tokens": rng(INT, 0), "echo": opt(BOOL), "logprobs": rng(INT, 0, 20), "best_of": rng(INT, 0, 20),
        "suffix": opt({**STR, "maxLength": 0})}, "prompt"),
    "Completion": obj({
        "id": STR, "object": {"const": "text_completion"}, "created": INT, "model": STR, "usage": USAGE,
        "choices": arr(obj({"index": INT, "text": STR, "finish_reason": {"enum": ["stop", "length"]},
                            "stop_reason": STOP_REASON,
                            "logprobs": opt(obj({"tokens": arr(STR), "token_logprobs": arr(opt(NUM)),
                                                 "top_logprobs": arr(opt({"type": "object",
                                                                          "additionalProperties": NUM})),
                                                 "text_offset": arr(INT)},
                                                "tokens", "token_logprobs", "top_logprobs", "text_offset"))},
                           "index", "text", "finish_reason", "logprobs"))},
        "id", "object", "created", "model", "choices", "usage"),
    "ResponsesRequest": obj({
        "model": opt(STR), "input": {"anyOf": [{**STR, "minLength": 1}, arr(OBJ, minItems=1)]},
        "instructions": opt(STR), "max_output_tokens": rng(INT, 1), "temperature": rng(NUM, 0),
        "top_p": rng(NUM, exclusiveMinimum=0, high=1), "stream": opt(BOOL), "store": opt(BOOL),
        "tools": opt(arr(obj({"type": {"const": "function"}, "name": {**STR, "minLength": 1}, "description": STR,
                              "parameters": opt(OBJ), "strict": opt(BOOL)}, "type", "name"))),
        "tool_choice": opt({"anyOf": [{"enum": ["none", "auto", "required"]},
                                      obj({"type": {"const": "function"}, "name": STR}, "type", "name")]}),
        "parallel_tool_calls": opt(BOOL), "text": opt(obj({"format": opt(OBJ)})),
        "reasoning": opt(obj({"effort": EFFORT})), "metadata": opt(OBJ),
        "previous_response_id": NULL, "conversation": NULL,
        "thinking_token_budget": rng(INT, -1), "thinking_budget_tokens": rng(INT, -1)}, "input"),
    "Response": obj({
        "id": STR, "object": {"const": "response"}, "created_at": INT, "completed_at": opt(INT), "model": STR,
        "status": {"enum": ["completed", "incomplete", "in_progress"]}, "error": NULL,
        "incomplete_details": opt(obj({"reason": STR}, "reason")),
        "output": arr({"anyOf": [
            obj({"type": {"const": "message"}, "id": STR, "role": {"const": "assistant"}, "status": STR,
                 "content": arr(obj({"type": {"const": "output_text"}, "text": STR, "annotations": arr(OBJ),
                                     "logprobs": arr(OBJ)}, "type", "text"))}, "type", "id", "role", "content"),
            obj({"type": {"const": "reasoning"}, "id": STR, "summary": arr(OBJ), "status": STR,
                 "content": arr(obj({"type": {"const": "reasoning_text"}, "text": STR}, "type", "text"))},
                "type", "id", "summary"),
            obj({"type": {"const": "function_call"}, "id": STR, "call_id": STR, "name": STR, "arguments": STR,
                 "status": STR}, "type", "call_id", "name", "arguments")]}),
        "usage": obj({"input_tokens": INT, "output_tokens": INT, "total_tokens": INT,
                      "input_tokens_details": obj({"cached_tokens": INT, "cache_write_tokens": INT}),
                      "output_tokens_details": obj({"reasoning_tokens": INT})},
                     "input_tokens", "output_tokens", "total_tokens"),
        "store": {"const": False}, "previous_response_id": NULL, "instructions": opt(STR),
        "max_output_tokens": opt(INT), "parallel_tool_calls": BOOL, "temperature": NUM, "top_p": NUM,
        "tools": arr(OBJ), "text": OBJ, "reasoning": OBJ, "metadata": OBJ},
        "id", "object", "created_at", "model", "status", "output"),
    "MessagesRequest": obj({
        "model": opt(STR), "max_tokens": {**INT, "minimum": 1}, "system": opt({"anyOf": [STR, arr(OBJ)]}),
        "messages": arr(obj({"role": {"enum": ["user", "assistant"]}, "content": {"anyOf": [STR, arr(
            obj({"type": STR}, "type"))]}}, "role", "content"), minItems=1),
        "tools": opt(arr(obj({"name": {**STR, "pattern": "^[a-zA-Z0-9_-]{1,128}$"}, "description": STR,
                              "input_schema": obj({"type": {"const": "object"}}, "type")}, "name", "input_schema"))),
        "tool_choice": opt(obj({"type": {"enum": ["auto", "any", "tool", "none"]}, "name": STR,
                                "disable_parallel_tool_use": BOOL}, "type")),
        "thinking": opt(obj({"type": {"enum": ["enabled", "adaptive", "disabled"]}, "budget_tokens": INT}, "type")),
        "output_config": opt(obj({"effort": {"enum": ["low", "medium", "high", "max"]}, "format": OBJ})),
        "stop_sequences": opt(arr({**STR, "minLength": 1}, maxItems=16)), "stream": opt(BOOL),
        "temperature": rng(NUM, 0), "top_p": rng(NUM, exclusiveMinimum=0, high=1), "top_k": rng(INT, 0),
        "metadata": opt(OBJ)}, "max_tokens", "messages"),
    "Message": obj({
        "id": STR, "type": {"const": "message"}, "role": {"const": "assistant"}, "model": STR,
        "content": arr({"anyOf": [obj({"type": {"const": "text"}, "text": STR}, "type", "text"),
                                  obj({"type": {"const": "thinking"}, "thinking": STR, "signature": STR},
                                      "type", "thinking", "signature"),
                                  obj({"type": {"const": "tool_use"}, "id": STR, "name": STR, "input": OBJ},
                                      "type", "id", "name", "input")]}),
        "stop_reason": {"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        "stop_sequence": opt(STR),
        "usage": obj({"input_tokens": INT, "output_tokens": INT, "cache_read_input_tokens": INT,
                      "cache_creation_input_tokens": INT}, "input_tokens", "output_tokens")},
        "id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"),
    "Model": obj({"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR, "max_model_len": INT},
                 "id", "object", "created", "owned_by"),
    "TokenizeRequest": obj({"content": STR, "prompt": STR, "with_pieces": BOOL}),
    "DetokenizeRequest": obj({"tokens": arr({**INT, "minimum": 0})}, "tokens"),
}
SCHEMAS["CountTokensRequest"] = {**SCHEMAS["MessagesRequest"], "required": ["messages"]}

# A stream's events, one schema each (OpenAPI 3.1 reads an event stream's schema per event):
# OpenAI's chat and completions send `data:` lines only, a JSON chunk each and then [DONE];
# the Messages and Responses APIs name every event (`event:`) and send its JSON as data.
_DATA = {**STR, "description": "a JSON chunk, or [DONE] last"}
_SSE = {"text/event-stream": {"schema": obj({"data": _DATA}, "data")}}
_NAMED_SSE = {"text/event-stream": {"schema": obj({"event": STR, "data": {**STR, "contentMediaType": "application/json"}},
                                                  "event", "data")}}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _errors(shape: str, *statuses: int) -> dict:
    words = {400: "a bad field, named", 401: "no or a wrong API key", 404: "another model's name, or no such route",
             413: "a body over the size limit", 503: "loading, or at capacity (Retry-After)"}
    return {str(s): {"description": words[s], "content": _json(ref(shape))} for s in statuses}


def _operation(summary: str, ok: dict, *, body: str | None = None, stream: dict | None = None,
               errors: str = "OpenAIError", secured: bool = True) -> dict:
    content = {**_json(ok), **(stream or {})}
    statuses = (400, 401, 404, 413, 503) if body else (401, 404, 503)
    op = {"summary": summary, "responses": {"200": {"description": "the answer" + (
        " (server-sent events when stream is true)" if stream else ""), "content": content},
        **_errors(errors, *(statuses if secured else (503,)))}}
    if body:
        op["requestBody"] = {"required": True, "content": _json(ref(body))}
    if secured:
        op["security"] = [{"bearer": []}, {"x-api-key": []}]
    return op


PATHS = {
    "/v1/chat/completions": {"post": _operation("Chat completion (OpenAI)", ref("ChatCompletion"),
                                                body="ChatCompletionRequest", stream=_SSE)},
    "/v1/completions": {"post": _operation("Completion (OpenAI, legacy)", ref("Completion"), body="CompletionRequest",
                                           stream=_SSE)},
    "/v1/responses": {"post": _operation("Response (OpenAI Responses API, stateless)", ref("Response"),
                                         body="ResponsesRequest", stream=_NAMED_SSE)},
    "/v1/messages": {"post": _operation("Message (Anthropic Messages API)", ref("Message"), body="MessagesRequest",
                                        stream=_NAMED_SSE, errors="AnthropicError")},
    "/v1/messages/count_tokens": {"post": _operation("Prompt tokens of a Messages request",
                                                     obj({"input_tokens": INT}, "input_tokens"),
                                                     body="CountTokensRequest", errors="AnthropicError")},
    "/v1/models": {"get": _operation("The served model", obj({"object": {"const": "list"}, "data": arr(ref("Model"))},
                                                              "object", "data"))},
    "/v1/models/{model}": {"get": {**_operation("One model by name", ref("Model")), "parameters": [
        {"name": "model", "in": "path", "required": True, "schema": STR}]}},
    "/tokenize": {"post": _operation("Text to token ids (llama-server's shape; vLLM's 'prompt' too)",
                                     obj({"tokens": arr({"anyOf": [INT, OBJ]}), "count": INT, "max_model_len": INT},
                                         "tokens", "count", "max_model_len"), body="TokenizeRequest")},
    "/detokenize": {"post": _operation("Token ids to text", obj({"content": STR, "prompt": STR}, "content", "prompt"),
                                       body="DetokenizeRequest")},
    "/props": {"get": _operation("What the loaded model takes (the chat page asks)", obj({
        "model": STR, "max_model_len": INT, "modalities": obj({"vision": BOOL}, "vision"), "thinking": BOOL},
        "model", "max_model_len", "modalities", "thinking"))},
    "/health": {"get": _operation("Ready (200) or loading (503)", obj({"status": {"const": "ok"}}, "status"),
                                  secured=False)},
    "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
        "description": "Prometheus text format", "content": {"text/plain": {"schema": STR}}}}}},
}


_REQUESTS = ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest", "MessagesRequest", "CountTokensRequest")


def describe(app: FastAPI, served_model_name: str) -> None:
    """Serve this document instead of the one FastAPI would derive from the handlers' signatures;
    a request's `model` is the served model's name or absent (another name is a 404)."""
    schemas = dict(SCHEMAS)
    for name in _REQUESTS:
        schemas[name] = {**schemas[name], "properties": {**schemas[name]["properties"],
                                                          "model": opt({"const": served_model_name})}}
    doc = {"openapi": "3.1.0", "info": {"title": app.title, "version": app.version, "description": app.description},
           "paths": PATHS, "components": {"schemas": schemas, "securitySchemes": {
               "bearer": {"type": "http", "scheme": "bearer"},
               "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key"}}}}
    app.openapi = lambda: doc
