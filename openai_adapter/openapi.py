"""What /openapi.json says: the real status codes, the OpenAI error body, the SSE and
text content types, and no 422 (validation errors are 400 here)."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict


class ErrorObject(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """Every error: `{"error": {"message", "type", "param", "code"}}` (health adds its details)."""

    model_config = ConfigDict(extra="allow")
    error: ErrorObject


_WHEN = {
    400: "Invalid request: bad JSON, wrong types, values out of range, unsupported fields, the prompt over "
         "the context (`code` `context_length_exceeded`)",
    401: "Missing or invalid API key (once keys exist)",
    404: "Unknown model (`model_not_found`) or one the key may not use",
    408: "The request body did not arrive within ADAPTER_BODY_TIMEOUT_S",
    413: "The request body is over ADAPTER_MAX_BODY_BYTES",
    429: "The key's rate limits or budgets, or the model at capacity (`over_capacity`); see Retry-After",
    500: "The model or the server failed",
    503: "The model is not ready, the inference server is down, or the server is shutting down; see Retry-After",
    504: "The request deadline passed",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": _WHEN[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


_USAGE = {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                           "completion_tokens": {"type": "integer"},
                                           "total_tokens": {"type": "integer"}}}


def _completion(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": [obj]}, "created": {"type": "integer"},
        "model": {"type": "string"}, "choices": {"type": "array", "items": choice}, "usage": _USAGE}}


_FINISH = {"type": "string", "enum": ["stop", "length"]}
# With `stream: true`. For an event stream, OpenAPI 3.1's `schema` describes one event
# (the reading schemathesis and OpenAPI 3.2's `itemSchema` share), not the body as a string.
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "description": "one server-sent event: `data: <chunk JSON>`, a failure after the first token as "
                   "`data: {\"error\": {...}}`, and last `data: [DONE]`",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}

CHAT = {200: {"description": "A chat completion, or its chunks as server-sent events with `stream: true`",
              "content": {"application/json": {"schema": _completion("chat.completion", {
                  "type": "object", "properties": {
                      "index": {"type": "integer"}, "finish_reason": _FINISH,
                      "message": {"type": "object", "properties": {"role": {"type": "string"},
                                                                   "content": {"type": "string"}}}}})},
                          **_SSE}},
        **errors(400, 401, 404, 408, 413, 429, 500, 503, 504)}
COMPLETIONS = {200: {"description": "A completion, or its chunks as server-sent events with `stream: true`",
                     "content": {"application/json": {"schema": _completion("text_completion", {
                         "type": "object", "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                                          "finish_reason": _FINISH}})},
                                 **_SSE}},
               **errors(400, 401, 404, 408, 413, 429, 500, 503, 504)}
MODELS = {200: {"description": "The models this key may use"}, **errors(401, 500, 503)}
# 400: a malformed version pin (`NAME@x`).
MODEL = {200: {"description": "One model"}, **errors(400, 401, 404, 500, 503)}
READY = {200: {"description": "Every model is ready and generated recently"},
         503: {"model": ErrorResponse, "description": "Not ready (details per model), or shutting down",
               "headers": _RETRY_AFTER}}
METRICS = {200: {"description": "Prometheus text format",
                 "content": {"text/plain": {"schema": {"type": "string"}}}}, **errors(401, 503)}


def install(app: FastAPI) -> None:
    """/openapi.json without FastAPI's 422 (this server answers 400) and its schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in doc.get("paths", {}).values():
                for op in path.values():
                    responses = op.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        # Errors are JSON also where the route's own answer is not (/metrics).
                        content = response.get("content", {})
                        if status >= "400" and content and "application/json" not in content:
                            response["content"] = {"application/json": next(iter(content.values()))}
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
