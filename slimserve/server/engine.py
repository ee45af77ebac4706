"""The generation engine: continuous batching of every request to one variant in one batch, whose rows
with a deadline it would miss step apart from the rest while they need to. It carries out the plans of
its `scheduler.Scheduler` (what each turn prefills, which rows step); it decides nothing itself.

Its prefill and decode steps run on the process's one compute thread (`compute.ComputeThread`), taking
turns with the other resident variants' engines; loading runs on a thread of its own, so a variant
loaded on demand does not stall the others' decoding. Requests reach the engine through a queue;
events come back to each request's asyncio queue.

transformers' own continuous batching (`init_continuous_batching`) was considered: it handles per-request
temperature/top-k/top-p but not per-request seeds, OpenAI penalties or top logprobs, so this module
keeps a small batcher over the model's forward and `DynamicCache` (see `batch.PaddedKVBatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from slimserve.models.loader import LoadedVariant
from slimserve.models.manifest import VariantManifest
from slimserve.server.admission import drain_seconds
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.compute import ComputeThread
from slimserve.server.detokenize import IncrementalDetokenizer
from slimserve.server.kv_cache import growing_cache
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile
from slimserve.server.sampling import Sampler, SamplingParams, TokenLogprob, sample_rows
from slimserve.server.scheduler import PREFILL_TOKENS, Scheduler, Turn, prompt_chunk
from slimserve.server.structured import MASK_MS_PRIOR, GrammarCache, TokenMask

log = logging.getLogger(__name__)

WARMUP_BATCHES = (1, 2, 4, 8, 16)
"""Batch sizes a variant's decode steps run at once when it loads (those up to its `max_batch_size`, and that)."""

WARMUP_STEPS = 2
"""Decode steps at each warm-up batch size: the first forward at a shape pays one-off costs (allocation,
kernel choice, lazy initialisation) that the first requests would otherwise pay and the profile learn."""


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


@dataclass(eq=False)  # identity: a sequence is found in (and removed from) the queue as itself
class _Sequence:
    handle: RequestHandle
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    submitted_at: float
    generated: list[int] = field(default_factory=list)
    last_token_at: float | None = None
    done: bool = False
    accounted: bool = False
    """Its end was counted (tokens, and its place among the admitted), which happens once."""

    @property
    def steps_left(self) -> int:
        return self.params.max_tokens - len(self.generated)

    # the scheduler's view of it (`scheduler.Job`)
    @property
    def deadline(self) -> float | None:
        return self.handle.deadline

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled.is_set()


@dataclass(eq=False)
class _Partial:
    """A sequence whose prompt is partly in its cache (`PREFILL_TOKENS` per turn)."""

    seq: _Sequence
    cache: DynamicCache
    done: int = 0
    """Prompt tokens already in the cache."""
    seconds: float = 0.0
    """Compute time of its chunks so far (the prefill as the profile learns it, without others' turns)."""
    left_s: float | None = None
    """Seconds to its deadline when its first chunk began (the turn trace)."""


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
    shares_compute: bool
    """Its steps take turns with other variants' on the same cores (CPU), rather than its own device share."""

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


class TransformersEngine:
    """Continuous batching over a transformers causal LM; its steps run on the shared compute thread."""

    shares_compute = True

    def __init__(
        self,
        load: Callable[[], LoadedVariant],
        name: str,
        metrics: ServerMetrics,
        manifest: VariantManifest | None = None,
        max_batch_size: int = 16,
        max_waiting: int = 64,
        compute: ComputeThread | None = None,
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
        self.scheduler: Scheduler[_Sequence] = Scheduler(max_batch_size)
        """Plans each turn; the engine carries its plans out."""
        self.compute = compute or ComputeThread.shared()
        self._inbox: deque[_Sequence] = deque()
        """Sequences waiting for a batch slot, oldest first (guarded by `_lock`)."""
        self._in_flight = 0
        """Sequences admitted and not yet finished, wherever they are (queued, prefilling, in a batch): what
        admission counts against max_batch_size + max_waiting (guarded by `_lock`)."""
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._attached = False
        self._batch = PaddedKVBatch()
        self._rows: list[_Sequence] = []
        self._express = PaddedKVBatch()
        self._express_rows: list[_Sequence] = []
        """Urgent rows, stepped apart from the rest of the batch while their deadlines need it (the scheduler's
        `schedule_decode`)."""
        self._last_turn: dict[str, Any] = {}
        self._partial: _Partial | None = None
        """The sequence being prefilled chunk by chunk; it counts as running (a batch slot is its)."""
        self._warm_up: list[Callable[[LoadedVariant], None]] = []
        """Pieces of the load-time warm-up still to run, one per turn (`_warm_up_pieces`)."""
        self._grammars: GrammarCache | None = None
        """Compiled JSON grammars for this tokenizer, built on the first structured request."""
        self._loader = threading.Thread(target=self._load_then_attach, name=f"load-{name}", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        self._loader.start()

    def fresh(self) -> TransformersEngine:
        """A new, unstarted engine for the same variant (an engine runs once; reloading needs another)."""
        return TransformersEngine(
            self._load, self.name, self.metrics, self.manifest, self.max_batch_size, self.max_waiting, self.compute
        )

    @property
    def running(self) -> int:
        """Sequences in the running batch (a finished one stops counting before its last event is sent)."""
        return sum(not s.done for s in self._running_rows())

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch slot (admission counts every admitted sequence: `_in_flight`)."""
        return len(self._inbox)

    @property
    def profile(self) -> CostProfile | None:
        """Live cost profile the router and the scheduler read; the compute thread feeds it prefill and step
        times."""
        return self.scheduler.profile

    @profile.setter
    def profile(self, profile: CostProfile | None) -> None:
        self.scheduler.profile = profile

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state is EngineState.READY

    def _drain_s(self, count: int) -> float:
        """Predicted seconds until `count` admitted sequences have finished (a 429's Retry-After): running ones
        after their remaining steps, queued ones in order as slots free, at the measured step time of a full
        batch. Called with `_lock` held."""
        step_s = self.scheduler.step_s(min(max(self._in_flight, 1), self.max_batch_size))
        running = [s.steps_left * step_s for s in self._running_rows() if not s.done]
        queued = [
            self.scheduler.prefill_s(s.prompt_tokens, s.prompt_tokens) + s.max_tokens * step_s for s in self._inbox
        ]
        return drain_seconds(running, queued, self.max_batch_size, count)

    def deadlines(self) -> list[tuple[float | None, int]]:
        """(deadline or None without a latency budget, tokens still to generate) of each running sequence."""
        return [(s.handle.deadline, s.steps_left) for s in self._running_rows() if not s.done]

    def _running_rows(self) -> list[_Sequence]:
        """Every sequence in either batch, and the one being prefilled in chunks (a snapshot: the compute
        thread may move rows meanwhile)."""
        partial = self._partial
        return list(self._rows) + list(self._express_rows) + ([partial.seq] if partial is not None else [])

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

    def submit(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None) -> RequestHandle:
        """Queue one sequence; raises EngineBusyError when `max_waiting` sequences already wait. Its `deadline`
        is known before the compute thread first sees it, so its prefill takes its earliest-deadline turn."""
        return self.submit_many([(prompt_ids, params)], deadline)[0]

    def submit_many(
        self, sequences: Sequence[tuple[list[int], SamplingParams]], deadline: float | None = None
    ) -> list[RequestHandle]:
        """Queue the sequences of one request (its choices, its prompts) in one step, all or none: raises
        EngineBusyError when they would take the queue past `max_waiting`.

        Why in one step: the compute thread takes what waits at the start of each turn, so choices queued one
        by one may be prefilled and stepped apart, and bf16 matmuls and torch's fp32 attention kernel round a
        row's last bits differently at batch 1 than at 2: the same seeded request with n=2 would not repeat.
        Queued together, its choices start in the same turns every time."""
        variant = self._require_variant()
        vocab = int(variant.model.config.vocab_size)
        built = []
        loop = asyncio.get_running_loop()
        for prompt_ids, params in sequences:
            handle = RequestHandle(f"{self.name}-{next(self._ids)}", prompt_ids, loop, deadline)
            built.append(
                _Sequence(  # built first: a sampler that rejects its parameters leaves nothing queued
                    handle=handle,
                    params=params,
                    sampler=Sampler(params, vocab, self._token_mask(variant, params, vocab)),
                    detokenizer=IncrementalDetokenizer(variant.tokenizer, prompt_ids, params.stop),
                    submitted_at=time.perf_counter(),
                )
            )
        with self._lock:
            excess = self._in_flight + len(built) - (self.max_batch_size + self.max_waiting)
            if excess > 0:
                raise EngineBusyError(
                    f"{self._in_flight} sequences are already admitted to {self.name} (at most "
                    f"{self.max_batch_size} running + {self.max_waiting} waiting; this request adds {len(built)})",
                    retry_after_s=self._drain_s(excess),
                )
            self._in_flight += len(built)
            self._inbox.extend(built)
            self.metrics.queue_depth.labels(self.name).set(len(self._inbox))
        self.compute.wake()
        return [seq.handle for seq in built]

    def _token_mask(self, variant: LoadedVariant, params: SamplingParams, vocab: int) -> TokenMask | None:
        """The sequence's grammar state if its output is constrained (`structured`), compiled once per schema."""
        if params.constraint is None:
            return None
        if self._grammars is None:  # on the event loop, like every submit: no other thread builds it
            self._grammars = GrammarCache(variant.tokenizer, vocab, variant.eos_token_ids)
        grammars = self._grammars
        return TokenMask(grammars.compile(params.constraint).grammar, grammars.observe_mask)

    @property
    def mask_ms_per_token(self) -> float:
        """What masking adds to each step of a constrained sequence (ms): measured once it has masked."""
        return self._grammars.mask_ms if self._grammars is not None else MASK_MS_PRIOR

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is running, leave the compute thread and drop the model."""
        with self._lock:
            self.state = EngineState.STOPPED
            attached = self._attached
        if attached:
            self.compute.wake()
            self._stopped.wait(timeout)
        elif self._loader.is_alive():
            self._loader.join(timeout)
        self.variant = None

    def _require_variant(self) -> LoadedVariant:
        if self.state is not EngineState.READY or self.variant is None:
            reason = f": {self.error}" if self.error else ""
            raise EngineNotReadyError(f"model {self.name!r} is {self.state.value}{reason}")
        return self.variant

    # ---- loader thread ---------------------------------------------------------------------------

    def _load_then_attach(self) -> None:
        try:
            variant = self._load()
            growing_cache(variant.model.config)  # refuses, at load, a model the padded batch cannot hold
        except Exception as exc:
            log.exception("failed to load %s", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            self._ready.set()
            return
        with self._lock:
            if self.state is EngineState.STOPPED:  # shut down while loading
                self._ready.set()
                return
            self.variant, self.manifest = variant, variant.manifest
            self._warm_up = self._warm_up_pieces(variant)
            self._attached = True
        log.info("%s loaded in %.1f s; warming up", self.name, variant.load_seconds)
        self.compute.attach(self)  # READY once its warm-up turns have run (`step`)

    def _warm_up_pieces(self, variant: LoadedVariant) -> list[Callable[[LoadedVariant], None]]:
        """The warm-up a variant runs before it serves, as vLLM's profiling run does: a prefill of a whole
        chunk, then `WARMUP_STEPS` decode steps at each batch size it will see, largest first (rows of
        different lengths, padded as in serving). Untimed: the profile learns from served requests only, so
        cold-start time never enters it. Without it the first requests would pay those costs, and the profile
        would learn the cold steps as the variant's speed.

        On the compute thread, a piece per turn, so the cores are not shared with a second torch thread
        and another variant's urgent steps can take turns between the pieces."""
        config = variant.model.config
        vocab = int(config.vocab_size)
        prompt = [i % vocab for i in range(1, PREFILL_TOKENS + 1)]
        sizes = sorted({b for b in WARMUP_BATCHES if b < self.max_batch_size} | {self.max_batch_size}, reverse=True)
        batch = PaddedKVBatch()

        def prefill(loaded: LoadedVariant) -> None:
            prefill_forward(loaded.model, growing_cache(config), prompt)

        def rows(loaded: LoadedVariant) -> None:
            for row in range(sizes[0]):
                cache = growing_cache(config)
                prefill_forward(loaded.model, cache, prompt[: 4 + row % 8])
                batch.add(cache)

        def steps(size: int) -> Callable[[LoadedVariant], None]:
            def run(loaded: LoadedVariant) -> None:
                if batch.size > size:
                    batch.keep(list(range(size)))
                tokens = torch.ones((size, 1), dtype=torch.long)  # (B, 1)
                for _ in range(WARMUP_STEPS):
                    step_forward(loaded.model, batch, tokens)

            return run

        return [prefill, rows, *(steps(size) for size in sizes)]

    # ---- compute thread ----------------------------------------------------------------------------

    def step(self) -> bool:
        """One turn: admit and prefill waiting sequences into free slots, then one decode step (of the whole
        batch, or of its urgent rows alone: `Scheduler.schedule_decode`). True if it ran either, even when every row it
        stepped finished: a turn reported as idle leaves the engine out of the compute thread's turns until
        the next request arrives, and the rest of its batch (or its waiting queue) with it.

        A forward that raises fails the variant, not the server (as vLLM's engine core dies alone): every
        request it holds ends with the error, and the engine reports FAILED with the reason."""
        variant = self.variant
        if self._warm_up and self.state is EngineState.LOADING and variant is not None:
            return self._warm_up_turn(variant)
        if self.state is not EngineState.READY or variant is None:
            self._stop()
            return False
        try:
            return self._turn(variant)
        except Exception as exc:
            log.exception("%s failed during a turn", self.name)
            with self._lock:
                self.error = f"{type(exc).__name__}: {exc}"
                self.state = EngineState.FAILED
            self._stop(f"{self.name} failed: {self.error}")
            return True

    def _warm_up_turn(self, variant: LoadedVariant) -> bool:
        """The next piece of the warm-up; after the last the engine is READY. A forward that raises fails
        the load, as a load that raises does."""
        self._last_turn = {"prefills": [], "warm_up": len(self._warm_up)}  # pieces left, this one included
        try:
            self._warm_up.pop(0)(variant)
        except Exception as exc:
            log.exception("%s failed to warm up", self.name)
            with self._lock:
                self.error = f"{type(exc).__name__}: {exc}"
                self.state = EngineState.FAILED
            self._warm_up = []
            self._stop()
            return True
        if not self._warm_up:
            with self._lock:
                if self.state is EngineState.LOADING:
                    self.state = EngineState.READY
            log.info("%s ready", self.name)
            self._ready.set()
        return True

    def _turn(self, variant: LoadedVariant) -> bool:
        eos = variant.eos_token_ids
        self._last_turn = {"prefills": []}
        admitted = self._admit(variant, self._batch, self._rows, eos)
        self._drop_cancelled()
        batch, rows = self._regroup(time.perf_counter())
        stepped = bool(rows)  # before the step: finished rows leave `rows` (`_compact`)
        if rows:
            self._last_turn.update(
                rows=[s.handle.request_id for s in rows],
                apart=batch is self._express,
                batch=len(self._rows) + len(self._express_rows),
            )
            self._decode_step(variant, batch, rows, eos)
        self.metrics.running.labels(self.name).set(len(self._rows) + len(self._express_rows))
        return admitted or stepped

    def _regroup(self, now: float) -> tuple[PaddedKVBatch, list[_Sequence]]:
        """Carry out the scheduler's decode plan (`Scheduler.schedule_decode`): the batch and rows to step,
        moving rows between the main batch and the one stepped apart."""
        main, express = list(self._rows), list(self._express_rows)
        apart = self.scheduler.schedule_decode(main, express, now)
        if apart is None:
            if express:
                self._batch.merge(self._express)
                self._express = PaddedKVBatch()
                self._rows, self._express_rows = main + express, []
            return self._batch, self._rows
        chosen = set(apart)
        leaving = [i for i, s in enumerate(express) if s not in chosen]
        if leaving:
            self._batch.merge(self._express.split(leaving))
            main += [express[i] for i in leaving]
            express = [s for s in express if s in chosen]
        joining = [i for i, s in enumerate(main) if s in chosen]
        if joining:
            self._express.merge(self._batch.split(joining))
            express += [main[i] for i in joining]
            main = [s for s in main if s not in chosen]
        self._rows, self._express_rows = main, express
        return self._express, self._express_rows

    def _drop_cancelled(self) -> None:
        """Finish the cancelled rows of both batches (a waiting batch would otherwise keep them)."""
        for batch, rows in ((self._batch, self._rows), (self._express, self._express_rows)):
            cancelled = [s for s in rows if s.handle.cancelled.is_set()]
            for seq in cancelled:
                self._finish(seq, GenerationEvent("", [], [], "abort", len(seq.generated)))
            if cancelled:
                self._compact(batch, rows)

    def detached(self) -> bool:
        return self._stopped.is_set()

    def last_turn(self) -> dict[str, Any]:
        """Its last turn's prefills (id, prompt and max tokens, seconds to the deadline then, seconds taken)
        and the rows its decode step served (whether stepped apart, and the batch's size)."""
        return self._last_turn

    def pending(self) -> Turn | None:
        """How urgently this engine needs its next turn (`Scheduler.turn`); None when it has nothing to do."""
        if self._warm_up and self.state is EngineState.LOADING:  # paced: urgent steps of others go first
            step_s = self.scheduler.step_s(1)
            return Turn(step_s=step_s, best_effort=True, cost_s=self.scheduler.step_s(self.max_batch_size))
        if self.state is not EngineState.READY or self.variant is None:
            return Turn(step_s=0.0, prefill=True)  # stopping: one more turn aborts what is left and detaches
        return self.scheduler.turn(self._waiting(), self._running_rows(), self._partial_state(), time.perf_counter())

    def _waiting(self) -> list[_Sequence]:
        with self._lock:
            return list(self._inbox)

    def _partial_state(self) -> tuple[_Sequence, int] | None:
        """The prompt under way and how many of its tokens are in its cache, as the scheduler takes it."""
        partial = self._partial
        return (partial.seq, partial.done) if partial is not None else None

    def _take_waiting(self) -> _Sequence | None:
        with self._lock:
            seq = self._inbox.popleft() if self._inbox else None
            self.metrics.queue_depth.labels(self.name).set(len(self._inbox))
        return seq

    def _stop(self, error: str | None = None) -> None:
        """End every sequence it holds (aborted on shutdown; with `error` when the engine failed) and detach."""
        reason, message = ("error", error) if error else ("abort", "server shutting down")
        for seq in self._running_rows():
            if not seq.done:
                self._finish(seq, GenerationEvent("", [], [], reason, len(seq.generated), message))
        self._partial = None
        while (waiting := self._take_waiting()) is not None:
            self._finish(waiting, GenerationEvent("", [], [], reason, 0, message))
        self._rows, self._batch = [], PaddedKVBatch()
        self._express_rows, self._express = [], PaddedKVBatch()
        self._stopped.set()
        self._ready.set()  # stopped or failed while warming up: nobody waits for it any longer

    def _admit(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]) -> bool:
        """Carry out the scheduler's prefill plan (`Scheduler.schedule_prefill`). True if it prefilled or took
        anything from the queue."""
        plan = self.scheduler.schedule_prefill(
            self._waiting(), self._running_rows(), self._partial_state(), time.perf_counter()
        )
        if plan.jump is not None:  # due sooner: its whole prompt this turn, the chunks under way wait
            under_way, self._partial = self._partial, None
            self._start_prefill(variant, plan.jump, batch, rows, eos)
            self._partial = under_way
            return True
        if plan.chunk and self._partial is not None:
            self._prefill_chunk(variant, self._partial, batch, rows, eos)
        for seq in plan.start:
            self._start_prefill(variant, seq, batch, rows, eos)
        return not plan.empty

    def _start_prefill(
        self, variant: LoadedVariant, seq: _Sequence, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]
    ) -> int:
        """Take `seq` from the queue and prefill its first chunk (it becomes the prompt under way if it has
        more); tokens prefilled returned."""
        with self._lock:
            self._inbox.remove(seq)
            self.metrics.queue_depth.labels(self.name).set(len(self._inbox))
        if seq.handle.cancelled.is_set():
            self._finish(seq, GenerationEvent("", [], [], "abort", 0))
            return 0
        deadline = seq.handle.deadline
        partial = _Partial(
            seq,
            growing_cache(variant.model.config),
            left_s=round(deadline - time.perf_counter(), 4) if deadline is not None else None,
        )
        self._partial = partial
        return self._prefill_chunk(variant, partial, batch, rows, eos)

    def _prefill_chunk(
        self, variant: LoadedVariant, partial: _Partial, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]
    ) -> int:
        """The next chunk of `partial`'s prompt (tokens prefilled returned); once the prompt is in, its first
        token is sampled and it joins the batch."""
        seq, prompt = partial.seq, partial.seq.handle.prompt_ids
        if seq.handle.cancelled.is_set():
            self._partial = None
            self._finish(seq, GenerationEvent("", [], [], "abort", 0))
            return 0
        chunk = prompt_chunk(prompt, partial.done)
        began = time.perf_counter()
        logits = prefill_forward(variant.model, partial.cache, chunk)
        partial.seconds += time.perf_counter() - began
        partial.done += len(chunk)
        last = partial.done >= len(prompt)
        self._last_turn.setdefault("prefills", []).append(
            {
                "id": seq.handle.request_id,
                "prompt": len(prompt),
                "max": seq.params.max_tokens,
                "left_s": partial.left_s,
                "tokens": len(chunk),
                "s": round(time.perf_counter() - began, 4),
                "last": last,
            }
        )
        if not last:
            return len(chunk)
        self._partial = None
        if self.profile is not None:
            self.profile.observe_prefill(len(prompt), partial.seconds)
        self._emit([seq], logits, eos)
        if not seq.done:
            batch.add(partial.cache)
            rows.append(seq)
        return len(chunk)

    def _decode_step(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]) -> None:
        input_ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long)  # (B, 1)
        began = time.perf_counter()
        logits = step_forward(variant.model, batch, input_ids)
        self._emit(rows, logits, eos)
        if self.profile is not None:  # the whole step as a client sees it: forward, sampling, delivery
            self.profile.observe_step(len(rows), time.perf_counter() - began)
        if any(s.done for s in rows):
            self._compact(batch, rows)

    def _compact(self, batch: PaddedKVBatch, rows: list[_Sequence]) -> None:
        keep = [i for i, s in enumerate(rows) if not s.done]
        batch.keep(keep)
        rows[:] = [rows[i] for i in keep]

    def _emit(self, stepped: list[_Sequence], logits: torch.Tensor, eos: set[int]) -> None:
        """Sample one token per sequence from its row of `logits` (B, vocab), detokenize, decide whether it
        finished, deliver the events."""
        now = time.perf_counter()
        deliveries: list[tuple[RequestHandle, GenerationEvent]] = []
        for seq, (token, logprob) in zip(stepped, sample_rows([s.sampler for s in stepped], logits), strict=True):
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
        if seq.accounted:
            return
        seq.accounted = True
        with self._lock:
            self._in_flight -= 1
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


def prefill_forward(model: Any, cache: DynamicCache, chunk: list[int]) -> torch.Tensor:
    """One chunk of a prompt into `cache`, after the tokens it holds (positions follow from its length); the
    last position's logits. The engine's and `slimserve profile`'s prefill."""
    input_ids = torch.tensor([chunk], dtype=torch.long)  # (1, T)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()  # (1, vocab)


def step_forward(model: Any, batch: PaddedKVBatch, input_ids: torch.Tensor) -> torch.Tensor:
    """One decode step of every row of `batch`, `input_ids` (B, 1) its next tokens; the logits (B, vocab).
    The engine's and `slimserve profile`'s decode step."""
    mask, positions = batch.step_inputs()
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache, use_cache=True
    )
    return out.logits[:, -1].float()  # (B, vocab)


def _put_all(items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
