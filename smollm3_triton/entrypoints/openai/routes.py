"""The OpenAI-compatible routes (and llama-server's /tokenize and /detokenize)."""
from __future__ import annotations

from fastapi import FastAPI, Request

from ..errors import APIError
from ..state import ServerState
from .protocol import parse_chat, parse_completion
from .protocol_responses import parse_responses
from .serving_chat import create_chat_completion
from .serving_completions import create_completion
from .serving_responses import create_response

COMPLETIONS_DEFAULT_MAX_TOKENS = 16       # the legacy API's default


def add_routes(app: FastAPI, state: ServerState) -> None:
    def model_card() -> dict:
        rt = state.ready()
        return {"id": state.served_model_name, "object": "model", "created": state.created,
                "owned_by": "smollm3-triton", "max_model_len": rt.max_seq_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        card = model_card()
        state.check_model(model)
        return card

    @app.post("/v1/responses")
    async def responses(request: Request):
        rt = state.ready()
        req = parse_responses(await state.json_body(request), rt.max_seq_len)
        state.check_model(req.model)
        return await create_response(request, state, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rt = state.ready()
        req = parse_chat(await state.json_body(request), rt.max_seq_len)
        state.check_model(req.model)
        return await create_chat_completion(request, state, req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.ready()
        req = parse_completion(await state.json_body(request), COMPLETIONS_DEFAULT_MAX_TOKENS)
        state.check_model(req.model)
        return await create_completion(request, state, req)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        rt = state.ready()
        body = await state.json_body(request)
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise APIError(400, "content: must be a string (the text to tokenize)", param="content")
        ids = rt.tokenizer.encode(text)
        out = {"tokens": ids, "count": len(ids), "max_model_len": rt.max_seq_len}
        if body.get("with_pieces") is True:
            out["tokens"] = [{"id": i, "piece": rt.tokenizer.decode([i])} for i in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(request: Request):
        rt = state.ready()
        body = await state.json_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "tokens: must be a list of token ids", param="tokens")
        bad = [i for i in ids if not 0 <= i < rt.tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"tokens: {bad[0]} is outside the vocabulary 0..{rt.tokenizer.vocab_size - 1}",
                           param="tokens")
        text = rt.tokenizer.decode(ids)
        return {"content": text, "prompt": text}
