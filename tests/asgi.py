"""Raw ASGI calls into an app, for what TestClient cannot do: a client that leaves mid-request, and several
requests interleaved on one event loop (a shutdown that reaches some of them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message


def wait_ready(client: TestClient) -> None:
    """Poll `/health` until the app's variants have loaded (20 s at most)."""
    for _ in range(400):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/health").json())


@dataclass
class Call:
    """One request in flight: what the app has sent so far, and a switch that disconnects its client."""

    task: asyncio.Task[None]
    sent: list[Message] = field(default_factory=list)
    leave: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> int | None:
        return next((int(m["status"]) for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def done(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent)

    def json(self) -> Any:
        return json.loads(self.body)

    def frames(self) -> list[str]:
        return [f for f in self.body.decode().split("\n\n") if f]


def start(
    app: ASGIApp,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    spec_version: str = "2.3",
    reports_leaving: bool = True,
) -> Call:
    """POST `body` as JSON to `path`; the client stays until `call.leave` is set. Call on a running loop.

    A client that left is told by a `send` that raises and, if `reports_leaving`, by `receive`. Under ASGI
    spec 2.3 (uvicorn's) Starlette listens on `receive` too; under 2.4 only `send` tells it."""
    raw = json.dumps(body).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    pairs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": pairs,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    body_sent = False
    call: Call

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await call.leave.wait()
        if not reports_leaving:
            await asyncio.Event().wait()  # a server that learns of it only when a write fails
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if call.leave.is_set() and message["type"] == "http.response.body":
            raise OSError("client disconnected")  # as uvicorn does on a closed connection
        call.sent.append(message)

    call = Call(task=asyncio.get_running_loop().create_task(_run(app, scope, receive, send)))
    return call


async def _run(app: ASGIApp, scope: dict[str, Any], receive: Any, send: Any) -> None:
    with contextlib.suppress(OSError, ClientDisconnect):  # the client left; the server would log and move on
        await app(scope, receive, send)
