"""The chat page (llama-server's web UI in small): `GET /` answers index.html and
`GET /webui/<file>` its scripts, style sheet and icon, all shipped in the package
(entrypoints/webui/, package data) and read once when the app is built. No build step, no
fetch from anywhere but this server: the page talks to /props and /v1/chat/completions.

Every answer carries a Content-Security-Policy of the page's own origin: scripts and
styles only from here (no inline script, no inline handler, no eval), requests only to
here, images from here or data: URLs (the user's own attachments, previewed before they
are sent). The files are small and change only with the package: each answer carries an
ETag (a hash of the content) and `Cache-Control: no-cache`, so a browser keeps its copy
but asks each load, and a new version is never hidden behind an old one (304 otherwise).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .errors import APIError

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
PREFIX = "/webui/"


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def page_files() -> dict[str, _File]:
    """The page's files by name, as the package ships them."""
    files = {}
    for entry in resources.files(__package__).joinpath("webui").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            files[entry.name] = _File(body, CONTENT_TYPES[suffix], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    if "index.html" not in files:
        raise FileNotFoundError("the chat page's index.html is missing from the package (entrypoints/webui/)")
    return files


def is_page_path(path: str) -> bool:
    """The page's own paths: public even when the API needs a key (the page asks for it)."""
    return path == "/" or path.startswith(PREFIX)


def add_routes(app: FastAPI) -> None:
    files = page_files()

    def answer(request: Request, name: str) -> Response:
        file = files.get(name)
        if file is None:
            raise APIError(404, f"no such file in the chat page: {name!r}"[:200])
        headers = {**HEADERS, "ETag": file.etag}
        if file.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.content_type, headers=headers)

    @app.get("/")
    async def index(request: Request):
        return answer(request, "index.html")

    @app.get(PREFIX + "{name}")
    async def asset(request: Request, name: str):
        if name == "index.html":            # one address per file
            raise APIError(404, "the chat page is at /")
        return answer(request, name)
