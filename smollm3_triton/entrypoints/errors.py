"""A refusal as every API answers it: status, message, kind, the field to blame and a code.

Each API writes the same APIError in its own shape: OpenAI's `{"error": {"message", "type",
"param", "code"}}` (chat, completions, responses, ...) or Anthropic's `{"type": "error",
"error": {"type", "message"}}` (/v1/messages); library refusals (RequestError) become
APIErrors with the API's names for their fields.
"""
from __future__ import annotations

from ..errors import ContextLengthError, FieldError, RequestError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        """Anthropic's kinds go by status (its SDK raises by status too); the field stays in the message."""
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error"}
ANTHROPIC_PREFIX = "/v1/messages"


def error_body(path: str, exc: APIError) -> dict:
    """The refusal in the shape of the API that `path` belongs to."""
    return exc.anthropic_body() if path.startswith(ANTHROPIC_PREFIX) else exc.openai_body()


def bad(param: str, message: str) -> APIError:
    """400 for one field of the request body."""
    return APIError(400, f"{param}: {message}", param=param)


def api_error_of(e: RequestError, names: dict[str, str]) -> APIError:
    """A library refusal in the API's words: `names` maps the library's argument names to the
    API's fields (max_new_tokens -> max_tokens, prompt -> messages, ...)."""
    param = names.get(e.param, e.param)
    if isinstance(e, ContextLengthError):
        message = e.describe(max_tokens=names.get("max_new_tokens", "max_new_tokens"),
                             remedy="start the server with a larger --max-seq-len")
    elif isinstance(e, FieldError):
        message = e.renamed(param)
    else:
        message = str(e)
    return APIError(400, message, param=param, code=e.code)
