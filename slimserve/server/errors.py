"""Every error leaves through here, shaped as OpenAI's `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimserve.server.protocol import ErrorInfo, ErrorResponse

_CODES = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    429: "queue_full",
    500: "internal_error",
    503: "unavailable",
}
"""The code of an error raised without one, so that no error leaves with `code: null`."""

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to report to the client with an HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = _valid_text(message)
        self.param = None if param is None else _valid_text(param)
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(
            message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_chunk(self) -> str:
        """The error as an SSE data chunk, for a stream that has already started."""
        return f"data: {json.dumps(self.body())}\n\n"


def _valid_text(text: str) -> str:
    """`text` with any lone surrogate (echoed from a request) replaced, so the error itself always encodes."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})
"""How pydantic names the member of a union a complaint is about; no request field has these names."""


def _field_path(loc: tuple[Any, ...] | list[Any]) -> list[str]:
    """The request field a pydantic location names, without the union branches and dict keys pydantic adds
    (`prompt.list[constrained-int].0` is `prompt.0`, `logit_bias.5.[key]` is `logit_bias`)."""
    parts = [str(p) for p in loc if p != "body"]
    if "[key]" in parts:
        parts = parts[: max(parts.index("[key]") - 1, 0)]
    return [p for p in parts if p not in _UNION_TAGS and not (("[" in p or "-" in p) and not p.lstrip("-").isdigit())]


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first complaint as one readable 400, naming the field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = _field_path(first.get("loc", ()))
    param = ".".join(loc) or (first.get("ctx") or {}).get("param")
    if kind == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if not loc and kind in {"model_attributes_type", "dict_type", "model_type"}:
        return APIError(400, "request body must be a JSON object", code="invalid_request")
    if kind in {"unsupported", "invalid_unicode"} or not loc:
        return APIError(400, str(first.get("msg", "invalid request")), param=param, code=kind or "invalid_value")
    if kind == "missing":
        return APIError(400, f"'{param}' is a required field", param=param, code="missing_field")
    message = f"{param}: {first.get('msg', 'invalid value')}"
    if "input" in first and not isinstance(first["input"], dict | list):
        message += f" (got {first['input']!r})"
    return APIError(400, message, param=param, code="invalid_type" if kind.endswith("_type") else "invalid_value")


def install_error_handlers(app: Any) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
