"""OpenAI's error JSON for every way an HTTP request can fail:
`{"error": {"message", "type", "param", "code"}}`, never FastAPI's 422 body or a traceback."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from .router_core import RouterError, Status

# Status -> (HTTP status, OpenAI error type, code)
_HTTP: dict[Status, tuple[int, str, str | None]] = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    Status.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    Status.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Status.UNAVAILABLE: (503, "service_unavailable_error", "service_unavailable"),
    Status.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
    Status.CANCELLED: (499, "invalid_request_error", "cancelled"),
    Status.INTERNAL: (500, "server_error", "internal_error"),
}


# The core's (gRPC's) prompt fields -> OpenAI's: the message keeps the core's wording.
_OPENAI_PARAM = {"chat": "messages", "text": "prompt", "token_ids": "prompt"}


class HttpError(Exception):
    """An HTTP failure not from the router core (auth, routing, the body itself)."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def of(cls, e: RouterError) -> HttpError:
        """The core's error; a prompt field the core names as gRPC does is OpenAI's here."""
        status, type_, code = _HTTP[e.status]
        param = _OPENAI_PARAM.get(e.param or "", e.param)
        return cls(status, e.message, type_, param, code)

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> HttpError:
        return cls(400, message, "invalid_request_error", param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def of_validation(e: ValidationError) -> HttpError:
    """The first pydantic error, naming its field (`messages.0.role: ...`); a model validator's
    ValueError already reads "field: why"."""
    err = e.errors(include_url=False)[0]
    # pydantic puts union members in the path ("stop", "list[str]", 0); OpenAI's param is the field.
    param = ".".join(
        str(p) for p in err["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TAGS)
    )
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not param:
        head, sep, _ = msg.partition(":")
        if sep and head.isidentifier():
            return HttpError.bad_request(msg, head)
        return HttpError.bad_request(f"request body: {msg}")
    return HttpError.bad_request(f"{param}: {msg}", param)


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ChatMessageIn", "StreamOptions"}
