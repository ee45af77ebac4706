"""The generation engine: one dedicated thread owns the model and decodes every request in one batch.

All torch work (load, prefill, decode) happens on that thread: measured here, running `generate` from
FastAPI's threadpool after the model was touched elsewhere cut bf16 decode from ~50 to ~33 tok/s.
Requests reach it through a queue; events come back to each request's asyncio queue.

transformers' own continuous batching (`init_continuous_batching`) was considered: it handles per-request
temperature/top-k/top-p but not per-request seeds, OpenAI penalties or top logprobs, so this module
keeps a small scheduler over the model's forward and `DynamicCache` (see `batch.PaddedKVBatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from slimserve.models.loader import LoadedVariant
from slimserve.models.manifest import VariantManifest
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.detokenize import IncrementalDetokenizer
from slimserve.server.metrics import ServerMetrics
from slimserve.server.router import LatencyProfile
from slimserve.server.sampling import Sampler, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineBusyError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


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

    def __init__(self, request_id: str, prompt_ids: list[int], loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.loop = loop
        self.queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        """Stop generating (client gone, or another choice failed); the engine drops it at its next step."""
        self.cancelled.set()

    async def events(self) -> AsyncIterator[GenerationEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None:
                self.finished = True
                return


@dataclass
class _Sequence:
    handle: RequestHandle
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    done: bool = False


class ServingEngine(Protocol):
    """What the pool and the app need from a backend (transformers on CPU, vLLM on GPU)."""

    name: str
    metrics: ServerMetrics
    manifest: VariantManifest | None
    state: EngineState
    error: str | None
    variant: Any
    profile: LatencyProfile | None
    max_batch_size: int

    def start(self) -> None: ...
    def wait_ready(self, timeout: float | None = None) -> bool: ...
    def fresh(self) -> ServingEngine: ...
    def shutdown(self, timeout: float = 10.0) -> None: ...
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle: ...
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


class TransformersEngine:
    """Continuous batching over a transformers causal LM, on one dedicated thread."""

    def __init__(
        self,
        load: Callable[[], LoadedVariant],
        name: str,
        metrics: ServerMetrics,
        manifest: VariantManifest | None = None,
        max_batch_size: int = 16,
        max_waiting: int = 64,
    ) -> None:
        self.name = name
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.variant: LoadedVariant | None = None
        self._sampling_defaults: dict[str, Any] | None = None
        self.manifest = manifest
        """Known before loading when the variant is a directory; filled in by the load otherwise."""
        self._load = load
        self.profile: LatencyProfile | None = None
        """Live latency profile the router reads; the engine thread feeds it prefill and step times."""
        self._running = 0
        self._inbox: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def fresh(self) -> TransformersEngine:
        """A new, unstarted engine for the same variant (an engine thread runs once; reloading needs another)."""
        return TransformersEngine(
            self._load, self.name, self.metrics, self.manifest, self.max_batch_size, self.max_waiting
        )

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return self._running

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch slot."""
        return self._waiting

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state is EngineState.READY

    @property
    def tokenizer(self) -> Any:
        return self._require_variant().tokenizer

    @property
    def context_length(self) -> int:
        return self._require_variant().context_length

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        if self._sampling_defaults is None:
            self._sampling_defaults = self._require_variant().sampling_defaults
        return self._sampling_defaults

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue one sequence; raises EngineBusyError when `max_waiting` sequences already wait."""
        variant = self._require_variant()
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise EngineBusyError(f"{self._waiting} sequences are already waiting for {self.name}")
            self._waiting += 1
            self.metrics.queue_depth.labels(self.name).set(self._waiting)
        handle = RequestHandle(f"{self.name}-{next(self._ids)}", prompt_ids, asyncio.get_running_loop())
        vocab = int(variant.model.config.vocab_size)
        sequence = _Sequence(
            handle=handle,
            params=params,
            sampler=Sampler(params, vocab),
            detokenizer=IncrementalDetokenizer(variant.tokenizer, prompt_ids, params.stop),
            submitted_at=time.perf_counter(),
        )
        self._inbox.put(sequence)
        return handle

    def shutdown(self, timeout: float = 10.0) -> None:
        self.state = EngineState.STOPPED
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _require_variant(self) -> LoadedVariant:
        if self.state is not EngineState.READY or self.variant is None:
            reason = f": {self.error}" if self.error else ""
            raise EngineNotReadyError(f"model {self.name!r} is {self.state.value}{reason}")
        return self.variant

    # ---- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.variant = self._load()
            self.manifest = self.variant.manifest
            self.state = EngineState.READY
            log.info("%s ready (loaded in %.1f s)", self.name, self.variant.load_seconds)
        except Exception as exc:
            log.exception("failed to load %s", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            return
        finally:
            self._ready.set()
        with torch.inference_mode():
            self._loop(self.variant)

    def _loop(self, variant: LoadedVariant) -> None:
        batch = PaddedKVBatch()
        rows: list[_Sequence] = []
        eos = variant.eos_token_ids
        while self.state is EngineState.READY:
            if not self._admit(variant, batch, rows, eos, block=not rows):
                break
            if rows:
                try:
                    self._decode_step(variant, batch, rows, eos)
                except Exception as exc:  # a failed step fails its batch, not the server
                    log.exception("decode step failed")
                    for seq in rows:
                        self._finish(seq, GenerationEvent("", [], [], "error", len(seq.generated), str(exc)))
                    batch.keep([])
                    rows.clear()
            self._running = len(rows)
            self.metrics.running.labels(self.name).set(len(rows))
        self._running = 0
        for seq in rows:
            self._finish(seq, GenerationEvent("", [], [], "abort", len(seq.generated), "server shutting down"))

    def _admit(
        self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int], block: bool
    ) -> bool:
        """Prefill waiting sequences into free batch slots; False once shutdown was asked."""
        while len(rows) < self.max_batch_size:
            try:
                seq = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if seq is None:
                return False
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.labels(self.name).set(self._waiting)
            if seq.handle.cancelled.is_set():
                self._finish(seq, GenerationEvent("", [], [], "abort", 0))
                continue
            try:
                began = time.perf_counter()
                cache, logits = self._prefill(variant, seq.handle.prompt_ids)
                if self.profile is not None:
                    self.profile.observe_prefill(len(seq.handle.prompt_ids), time.perf_counter() - began)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, GenerationEvent("", [], [], "error", 0, str(exc)))
                continue
            self._emit([(seq, logits[0])], eos)
            if not seq.done:
                batch.add(cache)
                rows.append(seq)
        return True

    def _prefill(self, variant: LoadedVariant, prompt_ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        cache = DynamicCache(config=variant.model.config)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)  # (1, T)
        out = variant.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1].float()  # (1, vocab)

    def _decode_step(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]) -> None:
        cancelled = [s for s in rows if s.handle.cancelled.is_set()]
        for seq in cancelled:
            self._finish(seq, GenerationEvent("", [], [], "abort", len(seq.generated)))
        if cancelled:
            self._compact(batch, rows)
            if not rows:
                return
        input_ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long)  # (B, 1)
        mask, positions = batch.step_inputs()
        began = time.perf_counter()
        out = variant.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()  # (B, vocab)
        self._emit(list(zip(rows, logits, strict=True)), eos)
        if self.profile is not None:  # the whole step as a client sees it: forward, sampling, delivery
            self.profile.observe_step(len(rows), time.perf_counter() - began)
        if any(s.done for s in rows):
            self._compact(batch, rows)

    def _compact(self, batch: PaddedKVBatch, rows: list[_Sequence]) -> None:
        keep = [i for i, s in enumerate(rows) if not s.done]
        batch.keep(keep)
        rows[:] = [rows[i] for i in keep]

    def _emit(self, stepped: list[tuple[_Sequence, torch.Tensor]], eos: set[int]) -> None:
        """Sample one token per sequence, detokenize, decide whether it finished, deliver the events."""
        now = time.perf_counter()
        deliveries: list[tuple[RequestHandle, GenerationEvent]] = []
        for seq, logits in stepped:
            token, logprob = seq.sampler.sample(logits)
            seq.generated.append(token)
            if seq.last_token_at is None:
                self.metrics.ttft.labels(self.name).observe(now - seq.submitted_at)
            else:
                self.metrics.tpot.labels(self.name).observe(now - seq.last_token_at)
            seq.last_token_at = now
            finish: str | None = None
            if token in eos and not seq.params.ignore_eos:
                text, finish = seq.detokenizer.flush(), "stop"
            else:
                delta = seq.detokenizer.add(token)
                text = delta.text
                if delta.stopped:
                    finish = "stop"
                elif len(seq.generated) >= seq.params.max_tokens:
                    text, finish = text + seq.detokenizer.flush(), "length"
            event = GenerationEvent(
                text, [token], [logprob] if logprob is not None else [], finish, completion_tokens=len(seq.generated)
            )
            if finish is not None:
                seq.done = True
                self._account(seq)
            deliveries.append((seq.handle, event))
        self._deliver(deliveries)

    def _finish(self, seq: _Sequence, event: GenerationEvent) -> None:
        seq.done = True
        self._account(seq)
        self._deliver([(seq.handle, event)])

    def _account(self, seq: _Sequence) -> None:
        self.metrics.prompt_tokens.labels(self.name).inc(len(seq.handle.prompt_ids))
        self.metrics.completion_tokens.labels(self.name).inc(len(seq.generated))

    @staticmethod
    def _deliver(deliveries: list[tuple[RequestHandle, GenerationEvent]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, GenerationEvent]]] = {}
        for handle, event in deliveries:
            by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
