"""OpenAI's published API schemas (github.com/openai/openai-openapi, MIT licence, Copyright (c)
OpenAI), the subset our tests validate against: tests/data/openai_openapi_subset.json holds
the component schemas below and everything they reference, unchanged, with the source commit.

The document says "openapi: 3.1.0" (JSON Schema 2020-12) but still marks 110 schemas with
OpenAPI 3.0's `nullable: true`, which 2020-12 ignores; its authors and OpenAI's SDKs read it as
"or null", and so does the validator here (the schema becomes anyOf [itself, null]).

Regenerate from a checkout of openai-openapi:
    python -m tests.helpers.openai_spec path/to/openapi.json <commit>
"""
from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

SUBSET = Path(__file__).parents[1] / "data" / "openai_openapi_subset.json"
ROOTS = ["CreateChatCompletionRequest", "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "CreateCompletionRequest", "CreateCompletionResponse", "ListModelsResponse", "Model", "ErrorResponse",
         "Response", "ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseCompletedEvent",
         "ResponseIncompleteEvent", "ResponseOutputItemAddedEvent", "ResponseOutputItemDoneEvent",
         "ResponseContentPartAddedEvent", "ResponseContentPartDoneEvent", "ResponseTextDeltaEvent",
         "ResponseTextDoneEvent", "ResponseFunctionCallArgumentsDeltaEvent", "ResponseFunctionCallArgumentsDoneEvent",
         "ResponseReasoningTextDeltaEvent", "ResponseReasoningTextDoneEvent", "ResponseErrorEvent"]


def subset(doc: dict, roots: list[str]) -> dict:
    schemas = doc["components"]["schemas"]
    keep: dict = {}

    def walk(node):
        if isinstance(node, dict):
            target = node.get("$ref")
            if isinstance(target, str) and target.startswith("#/components/schemas/"):
                name = target.rsplit("/", 1)[1]
                if name not in keep:
                    keep[name] = schemas[name]
                    walk(schemas[name])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in roots:
        keep[name] = schemas[name]
        walk(schemas[name])
    return dict(sorted(keep.items()))


@lru_cache(maxsize=1)
def _doc() -> dict:
    return json.loads(SUBSET.read_text())


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` as JSON Schema says it: anyOf [the schema, null]."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=None)
def _validator(name: str):
    from jsonschema import Draft202012Validator
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                 "components": _nullable(_doc()["components"])})


def errors(name: str, instance) -> list[str]:
    """Where `instance` breaks OpenAI's schema `name` (empty: it conforms)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in _validator(name).iter_errors(instance)]


def event_schema(event_type: str) -> str:
    """The component schema of a Responses stream event type (response.output_text.delta -> ResponseTextDeltaEvent)."""
    names = {"response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
             "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
             "response.output_item.added": "ResponseOutputItemAddedEvent",
             "response.output_item.done": "ResponseOutputItemDoneEvent",
             "response.content_part.added": "ResponseContentPartAddedEvent",
             "response.content_part.done": "ResponseContentPartDoneEvent",
             "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
             "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
             "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
             "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
             "response.reasoning_text.done": "ResponseReasoningTextDoneEvent", "error": "ResponseErrorEvent"}
    return names[event_type]


if __name__ == "__main__":
    source, commit = sys.argv[1], sys.argv[2]
    full = json.loads(Path(source).read_text())
    out = {"source": f"https://github.com/openai/openai-openapi/blob/{commit}/openapi.json",
           "license": "MIT, Copyright (c) OpenAI (the repository's LICENSE); component schemas kept unchanged",
           "openapi": full["openapi"], "info_version": full["info"]["version"],
           "components": {"schemas": subset(full, ROOTS)}}
    SUBSET.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(out['components']['schemas'])} schemas -> {SUBSET}")
