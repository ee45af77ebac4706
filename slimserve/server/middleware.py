"""ASGI middleware that runs before a route reads its body: the API key, and request metrics with bounded labels.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`: that one wraps `receive` in a task group that
swallows the `http.disconnect` a route polls for, so a non-streaming request ran on after its client left.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimserve.server.errors import APIError
from slimserve.server.metrics import ServerMetrics

UNKNOWN_MODEL = "unknown"
"""The `model` label of requests that named no served variant: client-chosen names never become labels."""

UNMATCHED_ENDPOINT = "unmatched"
"""The `endpoint` label of requests to paths no route serves."""


class RequireKey:
    """`Authorization: Bearer <key>` on every path but `open_paths`, checked before the body is parsed (so a
    client without the key learns nothing from how its body is judged) and in constant time."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: Collection[str] = ("/health",)) -> None:
        self.app = app
        self.key = None if api_key is None else api_key.encode("utf-8")
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if not self.authorized(dict(scope["headers"]).get(b"authorization", b"")):
            error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        assert self.key is not None
        # compare_digest takes time independent of where the bytes differ; the scheme is not secret
        return hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"


class CountRequests:
    """`slimserve_requests_total` by served variant, route and status, for POSTs under /v1/.

    Labels come only from the server's own names: the variant a request was served by (or named, if the
    server serves it) else `unknown`, and the route's template (or a route's path, for a request refused
    before routing) else `unmatched`, so no client can grow the scrape by sending new names."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServerMetrics,
        served: Callable[[], Collection[str]],
        endpoints: Callable[[], Collection[str]],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.served = served
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes the app is answered with 500 by the outermost middleware

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None:
                endpoint = scope["path"] if scope["path"] in self.endpoints() else UNMATCHED_ENDPOINT
            model = (scope.get("state") or {}).get("model")
            label = model if isinstance(model, str) and model in self.served() else UNKNOWN_MODEL
            self.metrics.requests.labels(label, endpoint, str(status)).inc()
