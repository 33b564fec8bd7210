"""One error type and one mapper: every error leaves as an OpenAI error body."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("openai_adapter")

# OpenAI `type` per HTTP status, where the caller does not say otherwise.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "server_error", 504: "timeout_error"}


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.extra_headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        out = dict(self.extra_headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        return out

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: int, code: str = "service_unavailable") -> OpenAIError:
    return OpenAIError(503, message, code=code, retry_after=retry_after)


def shutting_down(retry_after: int) -> OpenAIError:
    # Connection: close, so a client's next request opens a connection to another replica.
    return OpenAIError(503, "the server is shutting down; retry on another connection", code="shutting_down",
                       retry_after=retry_after, headers={"Connection": "close"})


def body_timeout(seconds: float) -> OpenAIError:
    # The rest of the body may still come: the connection cannot be reused.
    return OpenAIError(408, f"the request body did not arrive within {seconds:g} s", code="request_timeout",
                       headers={"Connection": "close"})


def over_capacity(message: str, retry_after: int) -> OpenAIError:
    return OpenAIError(429, message, code="over_capacity", retry_after=retry_after)


def deadline_exceeded(seconds: float) -> OpenAIError:
    return OpenAIError(504, f"the request did not finish within its deadline of {seconds:g} s",
                       code="deadline_exceeded")


class ClientGone(Exception):
    """The client disconnected; there is nobody to answer."""


# Model error messages carry their kind as a prefix (ARCHITECTURE.md).
_PREFIXES = ("invalid_request: ", "context_length_exceeded: ", "over_capacity: ", "cancelled: ", "internal: ")


def from_model_message(message: str, retry_after: int) -> OpenAIError | ClientGone:
    """Map an error message from the model (or Triton) to what the client gets."""
    msg = message.strip()
    # tritonclient may prefix "[StatusCode.X] " on stream errors.
    if msg.startswith("[StatusCode.") and "] " in msg:
        msg = msg.split("] ", 1)[1]
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            text = msg[len(prefix):]
            if prefix == "invalid_request: ":
                return invalid(text)
            if prefix == "context_length_exceeded: ":
                return invalid(text, code="context_length_exceeded")
            if prefix == "over_capacity: ":
                return over_capacity(text, retry_after)
            if prefix == "cancelled: ":
                return ClientGone(text)
            return OpenAIError(500, text, code="internal_error")
    low = msg.lower()
    if "exceeds maximum queue size" in low:
        return over_capacity("the model's queue is full; retry later", retry_after)
    if "is not ready" in low or "unknown model" in low or "is not found" in low or "unavailable" in low:
        return unavailable("the model is not ready on the inference server", retry_after, code="model_not_ready")
    # Unprefixed: something in Triton itself. Log it; never show internals to the client.
    log.warning("unclassified upstream error: %s", msg)
    return OpenAIError(500, "the inference server failed to process the request", code="upstream_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-str", "constrained-int"}


def _most_telling(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """Of a union's errors, one about the value (too long, too big) beats "wrong type"."""
    return sorted(errors, key=lambda e: (e.get("type", "").endswith(("_type", "_parsing")), -len(e.get("loc", ()))))[0]


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None]:
    # pydantic puts union member tags in loc ("constrained-str", "list[str]"): not field names.
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not any(c in p for c in "[-") and p not in _TYPE_TAGS]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if kind == "missing":
        if param is None:
            return "the request body is empty; send a JSON object", None
        return f"missing required field {param!r}", param
    if kind == "model_attributes_type" and not loc:
        if isinstance(err.get("input"), (bytes, str)):
            return "the request body must be a JSON object (send Content-Type: application/json)", None
        return "the request body must be a JSON object", None
    received = err.get("input")
    if isinstance(received, list):
        text = f"a list of {len(received)}"
    elif isinstance(received, dict):
        text = "an object"
    else:
        text = repr(received)
    if len(text) > 80:
        text = text[:77] + "..."
    where = f"{param}: " if param else ""
    return f"{where}{err.get('msg', 'invalid value')} (received {text})", param


def install(app: FastAPI) -> None:
    """Route every failure through one mapper to the OpenAI error body."""

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = _validation_message(_most_telling(errors)) if errors else ("invalid request", None)
        # Union alternatives of the same field are one mistake, not several.
        top = lambda e: str((_validation_message(e)[1] or "").split(".")[0])  # noqa: E731
        others = {top(e) for e in errors} - {(param or "").split(".")[0]}
        if others:
            message += f" (and {len(others)} more invalid field{'s' if len(others) > 1 else ''})"
        return invalid(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = OpenAIError(404, f"no route {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = OpenAIError(405, f"method {request.method} is not allowed on {request.url.path}",
                              code="method_not_allowed")
        else:
            err = OpenAIError(exc.status_code, str(exc.detail))
        resp = err.response()
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return OpenAIError(500, "internal server error", code="internal_error").response()
