"""The OpenAPI document as the server really answers: 400 (never FastAPI's 422), 401 where a key is
required, 404/429/503 with OpenAI's error shape, and `text/event-stream` for streamed completions."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from slimserve.server.protocol import ErrorResponse

_WHY = {
    400: "A bad value (the error's `param` names the field), an unsupported field, or a request too large for "
    "the server.",
    401: "Missing or wrong API key.",
    404: "No such model.",
    429: "The model's queue is full; retry after `Retry-After` seconds.",
    503: "The model is loading, failed to load (the message says why), or the server is shutting down.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with OpenAI's error body (and Retry-After where one is sent)."""
    found: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        found[status] = {"model": ErrorResponse, "description": _WHY[status]}
        if status in (429, 503):
            found[status]["headers"] = _RETRY_AFTER
    return found


STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion, or with `stream: true` server-sent events: one JSON chunk per `data:` "
        "line, an error chunk if generation fails or the server shuts down, then `data: [DONE]`.",
        "content": {
            "text/event-stream": {
                "schema": {  # one event (OpenAPI 3.1 has no itemSchema)
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "string",
                            "description": "A chunk (chat.completion.chunk or text_completion) or an error body, as "
                            "JSON; the last event's data is [DONE].",
                        }
                    },
                    "required": ["data"],
                }
            }
        },
    }
}


def install_openapi(app: FastAPI, protected: bool, open_paths: Collection[str]) -> None:
    """Generate the document once, without 422s, with 401 and the bearer scheme on every protected path."""

    def document() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        # the completion routes declare ErrorResponse, so the document defines it
        error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if protected and path not in open_paths:
                    responses["401"] = {
                        "description": _WHY[401],
                        "content": {"application/json": {"schema": error_ref}},
                    }
                    operation["security"] = [{"bearer": []}]
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        if protected:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        app.openapi_schema = schema
        return schema

    app.openapi = document  # type: ignore[method-assign]
