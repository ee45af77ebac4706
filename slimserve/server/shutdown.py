"""Graceful shutdown, as vLLM's `--shutdown-timeout`: on SIGTERM (or SIGINT) the server stops accepting,
lets running requests finish for up to the timeout, then ends what is left (a stream with an error chunk
and `[DONE]`, a blocking request with a 503) and exits 0. A second signal exits at once.

uvicorn alone waits for every open connection without limit, and the engines' own "shutting down" abort
runs only after that wait, so long streams outlived SIGTERM by minutes and a second SIGTERM did nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn

from slimserve.server.serving_engine import GenerationEvent, RequestHandle

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
"""Seconds running requests get to finish after SIGTERM; Kubernetes' terminationGracePeriodSeconds must
exceed the preStop sleep plus this (deploy/k8s/deployment.yaml)."""

SHUTTING_DOWN = "server shutting down"
"""The error of a sequence ended by shutdown (the engines' own abort says the same)."""

ENGINE_STOP_S = 1.0
"""How long the app's shutdown waits for each engine to stop: a forward under way cannot be interrupted,
and on a busy host one took over a second, which pushed the exit past the timeout + 2 s. The process ends
right after (`serve`), so a step still running then is simply abandoned."""

BACKSTOP_S = 2.0
"""uvicorn's own limit runs this much past ours: it cancels whatever is still open (no final chunk)."""


class Drain:
    """The app's side of a shutdown: whether it has begun, and the end of every request still open."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self._open: weakref.WeakSet[RequestHandle] = weakref.WeakSet()
        self._timer: asyncio.TimerHandle | None = None

    def track(self, handles: list[RequestHandle]) -> None:
        """Sequences of a request that shutdown must end if they outlive the timeout."""
        self._open.update(handles)
        if self.expired:
            self._end(handles)

    def begin(self, timeout_s: float) -> None:
        """Refuse new requests from now on and end the open ones after `timeout_s` (on the event loop)."""
        if self.draining:
            return
        self.draining = True
        log.info("shutting down: %d open sequences get %.1f s to finish", len(self._open), timeout_s)
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self.expire)

    def expire(self) -> None:
        """End every open sequence now: its request sees an abort that says the server is shutting down."""
        self.draining = self.expired = True
        if self._timer is not None:
            self._timer.cancel()
        self._end(list(self._open))

    @staticmethod
    def _end(handles: list[RequestHandle]) -> None:
        for handle in handles:
            if not handle.finished:
                handle.cancel()  # the engine drops it at its next step
                handle.queue.put_nowait(GenerationEvent("", [], [], "abort", 0, SHUTTING_DOWN))


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a bounded drain: the first signal begins it, a second one forces the exit, and
    the signal is not raised again after a clean shutdown (uvicorn re-raises it, so the exit status was
    143 rather than 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, timeout_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.timeout_s = timeout_s
        self.forced_by: int | None = None
        """The signal that forced the exit, if a second one came."""
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if self.should_exit:
            log.warning("second signal: exiting now")
            self.force_exit = True
            self.forced_by = sig
            if loop is not None:
                loop.call_soon_threadsafe(self.drain.expire)
            return
        self.should_exit = True
        if loop is not None:
            loop.call_soon_threadsafe(self.drain.begin, self.timeout_s)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: Any, host: str, port: int, log_level: str, timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
    """Run `app` (built by `create_app`, whose `state.drain` ends its requests) until a signal drains it, then
    end the process: 0 after a drain, 128 + the signal when a second one forced the exit.

    The process ends with `os._exit` once the app has shut down: the interpreter's own finalization ran
    while daemon threads (the compute thread, torch's worker pools) could still be inside native code, and
    aborted now and then on a busy host (`terminate called without an active exception`, status 134)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(timeout_s + BACKSTOP_S + 0.999)
    )
    server = GracefulServer(config, app.state.drain, timeout_s)
    server.run()
    if not server.should_exit:  # it never started (uvicorn reported why): leave through the usual path
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.forced_by is None else 128 + server.forced_by)
