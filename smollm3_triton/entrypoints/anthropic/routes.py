"""The Anthropic Messages API's routes; their errors come in its shape (the app picks it by path)."""
from __future__ import annotations

from fastapi import FastAPI, Request

from ..state import ServerState
from .protocol import parse_count_tokens, parse_messages
from .serving import count_tokens, create_message


def add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        state.ready()
        req = parse_messages(await state.json_body(request))
        state.check_model(req.model)
        return await create_message(request, state, req)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request):
        state.ready()
        model, chat = parse_count_tokens(await state.json_body(request))
        state.check_model(model)
        return await count_tokens(state, chat)
