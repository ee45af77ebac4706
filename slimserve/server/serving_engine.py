"""What every serving engine is to the layers above it (the pool, the router, the OpenAI layer): the
`ServingEngine` protocol both backends meet (transformers on CPU, vLLM), the handle a submitted sequence
is read through (`RequestHandle`), the events it yields (`GenerationEvent`), the engine's state and the two
errors it raises. Engines import this module; nothing here imports an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from slimserve.models.manifest import VariantManifest
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile, Sharing
from slimserve.server.sampling import SamplingParams, TokenLogprob


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineBusyError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        """The engine's estimate of when enough of what it holds will have finished to admit the request."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading or failed to load (HTTP 503)."""


@dataclass
class GenerationEvent:
    """What one decode step produced for one sequence."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    """`stop` (EOS or a stop string), `length` (max_tokens), `abort` or `error`; None while running."""
    completion_tokens: int = 0
    error: str | None = None


class RequestHandle:
    """A submitted sequence: iterate its events from the event loop, or cancel it."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False
        self.deadline = deadline
        """`time.perf_counter()` by which the client's latency budget wants it done (routed requests only)."""
        self.completion_tokens = 0
        """Tokens generated as of the last event read (`events`)."""
        self.finish_reason: str | None = None
        """How it ended, once its last event was read."""

    def cancel(self) -> None:
        """Stop generating (client gone, or another choice failed); the engine drops it at its next step."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        while True:
            event = await self.queue.get()
            self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            yield event
            if event.finish_reason is not None:
                self.finished = True
                return


class ServingEngine(Protocol):
    """What the pool and the app need from a backend (transformers on CPU, vLLM on GPU)."""

    name: str
    metrics: ServerMetrics
    manifest: VariantManifest | None
    state: EngineState
    error: str | None
    variant: Any
    profile: CostProfile | None
    max_batch_size: int
    max_waiting: int
    """Sequences that may wait beyond the batch: the engine holds at most max_batch_size + max_waiting."""
    sharing: Sharing
    """How its steps share the hardware with other variants' (`profile.Sharing`)."""

    def start(self) -> None: ...
    def wait_ready(self, timeout: float | None = None) -> bool: ...
    def fresh(self) -> ServingEngine: ...
    def shutdown(self, timeout: float = 10.0) -> None: ...
    def submit(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> RequestHandle:
        """Queue one sequence; `deadline` (`time.perf_counter()`) is when its latency budget ends, if any."""
        ...

    def submit_many(
        self, sequences: Sequence[tuple[list[int], SamplingParams]], deadline: float | None = None
    ) -> list[RequestHandle]:
        """Queue the sequences of one request together, all or none."""
        ...

    @property
    def tokenizer(self) -> Any: ...
    @property
    def context_length(self) -> int: ...
    @property
    def sampling_defaults(self) -> dict[str, Any]: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    def deadlines(self) -> list[tuple[float | None, int]]: ...
    def waiting_before(self, deadline: float | None) -> int: ...


def deliver(deliveries: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    """Hand events to their handles from another thread (the compute thread): one call into each handle's
    event loop for all of its events."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, GenerationEvent]]] = {}
    for handle, event in deliveries:
        by_loop.setdefault(handle.loop, []).append((handle, event))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
