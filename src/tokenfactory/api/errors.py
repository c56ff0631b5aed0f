"""Errors in each protocol's own format.

Anthropic: ``{"type": "error", "error": {"type", "message"}, "request_id"}`` plus a
``request-id`` header. OpenAI: ``{"error": {"message", "type", "param", "code"}}``. Which format
a response uses is decided by the route (``/v1/chat/completions`` and ``/v1/completions`` speak
OpenAI, everything else Anthropic), so the same failure reads naturally to either SDK.
"""
from __future__ import annotations

import re
import secrets
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel

# status -> Anthropic error type (the SDK maps these back to exception classes)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",   # the client took too long to send its request
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# status -> OpenAI error type
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    529: "server_error",
}
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")


class APIError(Exception):
    """An error with an HTTP status; the handler renders it in the caller's protocol."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.code = code


_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})   # list items with no text inside


def find_lone_surrogate(value: Any) -> str | None:
    """The dotted path of the first string (or dict key) in ``value`` holding a lone UTF-16
    surrogate, else None. JSON can spell one (``"\\ud800"``) but it is not text: it cannot be
    encoded as UTF-8, so echoing it back (a model name in an error, a tool_use id) or
    tokenizing it would fail. Walked without recursion; an ASCII string costs one C call and
    a path is only spelled out for the string that fails."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return _dotted(path) or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    return (_dotted(path) or "body") + " (a key)"
                if isinstance(v, (str, dict, list)):
                    stack.append((v, (path, k)))
        elif isinstance(item, list) and not _SCALARS.issuperset(map(type, item)):
            stack.extend((v, (path, i)) for i, v in enumerate(item)
                         if isinstance(v, (str, dict, list)))
    return None


def _dotted(path: tuple) -> str:
    parts = []
    while path:
        path, key = path
        parts.append(str(key))
    return ".".join(reversed(parts))


def reject_lone_surrogates(data: Any) -> Any:
    """A pydantic ``mode="before"`` validator body: ``data`` unchanged, or ValueError."""
    where = find_lone_surrogate(data)
    if where is not None:
        where = _SURROGATE.sub("\ufffd", where)
        raise ValueError(f"{where}: the string contains a lone UTF-16 surrogate (an unpaired "
                         "\\ud800-\\udfff escape), which is not valid Unicode text")
    return data


def safe_text(text: str) -> str:
    """``text`` with lone surrogates replaced, so it can always be sent as UTF-8."""
    return text if text.isascii() or not _SURROGATE.search(text) else _SURROGATE.sub("\ufffd", text)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def anthropic_error_body(status: int, message: str, request_id: str | None = None) -> dict:
    body: dict[str, Any] = {"type": "error",
                            "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"),
                                      "message": safe_text(message)}}
    if request_id:
        body["request_id"] = request_id
    return body


def openai_error_body(status: int, message: str, param: str | None = None,
                      code: str | None = None) -> dict:
    return {"error": {"message": safe_text(message),
                      "type": OPENAI_TYPES.get(status, "server_error"),
                      "param": None if param is None else safe_text(param), "code": code}}


def error_response(path: str, status: int, message: str, *, request_id: str,
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if is_openai_path(path):
        body = openai_error_body(status, message, param, code)
    else:
        body = anthropic_error_body(status, message, request_id)
    hdrs = {"request-id": request_id, "x-request-id": request_id, **(headers or {})}
    return JSONResponse(body, status_code=status, headers=hdrs)


def format_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message from pydantic/FastAPI validation errors, and the first bad field."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        field = ".".join(loc)
        first = first or field or None
        msg = err.get("msg", "invalid value")
        if err.get("type") == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]   # our own validators' messages read as they are
        if err.get("type") == "json_invalid":
            return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", msg)), None
        parts.append(f"{field}: {msg}" if field else msg)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return "; ".join(parts) or "invalid request", first


# --------------------------------------------------------------- OpenAPI declarations
class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorBody(BaseModel):
    """What every Anthropic route answers on failure (declared in /openapi.json)."""
    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """What the OpenAI routes answer on failure."""
    error: OpenAIErrorDetail


_DESCRIPTIONS = {400: "Invalid request", 401: "Missing or invalid API key",
                 403: "The key may not use this path (e.g. /metrics needs the metrics key)",
                 408: "Request head or body not received in time",
                 404: "Unknown model or path", 405: "Method not allowed",
                 413: "Request body too large", 429: "Queue full (OpenAI routes); retry later",
                 500: "Engine or internal failure", 503: "Engine not running",
                 529: "Queue full (Anthropic routes); retry later"}


def declared_errors(*statuses: int, openai: bool = False) -> dict[int, dict]:
    """``responses=`` for a route: the statuses it can fail with, in its protocol's format."""
    model = OpenAIErrorBody if openai else AnthropicErrorBody
    return {s: {"model": model, "description": _DESCRIPTIONS[s]} for s in statuses}
