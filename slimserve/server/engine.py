"""The generation engine: continuous batching of every request to one variant in one batch, whose rows
with a deadline it would miss step apart from the rest while they need to. It carries out the plans of
its `scheduler.Scheduler` (what each turn prefills, which rows step); it decides nothing itself.

This module is the engine's life and its face to the layers above (`serving_engine.ServingEngine`):
loading, the paced warm-up, admission into its queue, shutdown and failure. What a turn does to the
running batch is `turns.RunningBatch`.

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
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from slimserve.models.loader import LoadedVariant
from slimserve.models.manifest import VariantManifest
from slimserve.server.admission import drain_seconds
from slimserve.server.compute import ComputeThread
from slimserve.server.detokenize import IncrementalDetokenizer
from slimserve.server.forward import warm_up_pieces
from slimserve.server.kv_cache import growing_cache
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile, Sharing
from slimserve.server.sampling import Sampler, SamplingParams
from slimserve.server.scheduler import Scheduler, Turn
from slimserve.server.sequence import EngineSequence
from slimserve.server.serving_engine import (
    EngineBusyError,
    EngineNotReadyError,
    EngineState,
    GenerationEvent,
    RequestHandle,
)
from slimserve.server.structured import MASK_MS_PRIOR, GrammarCache, TokenMask
from slimserve.server.turns import RunningBatch

log = logging.getLogger(__name__)


class TransformersEngine:
    """Continuous batching over a transformers causal LM; its steps run on the shared compute thread."""

    sharing: Sharing = "deadline"

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
        self.scheduler: Scheduler[EngineSequence] = Scheduler(max_batch_size)
        """Plans each turn; the running batch carries its plans out (`batch`)."""
        self.compute = compute or ComputeThread.shared()
        self._inbox: deque[EngineSequence] = deque()
        """Sequences waiting for a batch slot, oldest first (guarded by `_lock`)."""
        self._in_flight = 0
        """Sequences admitted and not yet finished, wherever they are (queued, prefilling, in a batch): what
        admission counts against max_batch_size + max_waiting (guarded by `_lock`)."""
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._attached = False
        self.batch = RunningBatch(name, metrics, self.scheduler, self)
        """The running batch and the prompt under way, advanced one turn at a time (`turns`)."""
        self._warm_up: list[Callable[[LoadedVariant], None]] = []
        """Pieces of the load-time warm-up still to run, one per turn (`forward.warm_up_pieces`)."""
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
        return sum(not s.done for s in self.batch.rows())

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
        running = [s.steps_left * step_s for s in self.batch.rows() if not s.done]
        queued = [
            self.scheduler.prefill_s(s.prompt_tokens, s.prompt_tokens) + s.max_tokens * step_s for s in self._inbox
        ]
        return drain_seconds(running, queued, self.max_batch_size, count)

    def deadlines(self) -> list[tuple[float | None, int]]:
        """(deadline or None without a latency budget, tokens still to generate) of each running sequence."""
        return [(s.handle.deadline, s.steps_left) for s in self.batch.rows() if not s.done]

    def waiting_before(self, deadline: float | None) -> int:
        """All of its queue: the scheduler admits first come first served (`Scheduler.admissible`)."""
        return self.waiting

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
                EngineSequence(  # built first: a sampler that rejects its parameters leaves nothing queued
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

    def adopt(self, variant: LoadedVariant) -> None:
        """Serve an already loaded `variant` at once, with no load thread, warm-up or compute thread: for a
        caller that takes the engine's turns itself (`step`), as the profiler does to time them."""
        with self._lock:
            self.variant, self.manifest, self.state = variant, variant.manifest, EngineState.READY
        self._ready.set()

    # ---- loader thread ---------------------------------------------------------------------------

    def _load_then_attach(self) -> None:
        try:
            variant = self._load()
            growing_cache(variant.model.config)  # refuses, at load, a model the padded batch cannot hold
        except Exception as exc:
            log.exception("failed to load %s", self.name)
            self._fail(exc)
            self._ready.set()
            return
        with self._lock:
            if self.state is EngineState.STOPPED:  # shut down while loading
                self._ready.set()
                return
            self.variant, self.manifest = variant, variant.manifest
            self._warm_up = warm_up_pieces(variant, self.max_batch_size)
            self._attached = True
        log.info("%s loaded in %.1f s; warming up", self.name, variant.load_seconds)
        self.compute.attach(self)  # READY once its warm-up turns have run (`step`)

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
            return self.batch.turn(variant)
        except Exception as exc:
            log.exception("%s failed during a turn", self.name)
            self._fail(exc)
            self._stop(f"{self.name} failed: {self.error}")
            return True

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED

    def _warm_up_turn(self, variant: LoadedVariant) -> bool:
        """The next piece of the warm-up; after the last the engine is READY. A forward that raises fails
        the load, as a load that raises does."""
        self.batch.last_turn = {"prefills": [], "warm_up": len(self._warm_up)}  # pieces left, this one included
        try:
            self._warm_up.pop(0)(variant)
        except Exception as exc:
            log.exception("%s failed to warm up", self.name)
            self._fail(exc)
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

    def detached(self) -> bool:
        return self._stopped.is_set()

    def last_turn(self) -> dict[str, Any]:
        """Its last turn's prefills (id, prompt and max tokens, seconds to the deadline then, seconds taken)
        and the rows its decode step served (whether stepped apart, and the batch's size)."""
        return self.batch.last_turn

    def pending(self) -> Turn | None:
        """How urgently this engine needs its next turn (`Scheduler.turn`); None when it has nothing to do."""
        if self._warm_up and self.state is EngineState.LOADING:  # paced: urgent steps of others go first
            step_s = self.scheduler.step_s(1)
            return Turn(step_s=step_s, best_effort=True, cost_s=self.scheduler.step_s(self.max_batch_size))
        if self.state is not EngineState.READY or self.variant is None:
            return Turn(step_s=0.0, prefill=True)  # stopping: one more turn aborts what is left and detaches
        return self.scheduler.turn(self.queued(), self.batch.rows(), self.batch.partial_state(), time.perf_counter())

    # ---- the queue, as a turn reaches it (`turns.AdmissionQueue`) ------------------------------------

    def queued(self) -> list[EngineSequence]:
        """The sequences waiting for a batch slot, oldest first (a snapshot)."""
        with self._lock:
            return list(self._inbox)

    def dequeue(self, seq: EngineSequence) -> None:
        """Take `seq` from the queue: its prefill starts."""
        with self._lock:
            self._inbox.remove(seq)
            self.metrics.queue_depth.labels(self.name).set(len(self._inbox))

    def retire(self, seq: EngineSequence) -> None:
        """`seq` has finished: it no longer counts against admission (`_in_flight`)."""
        with self._lock:
            self._in_flight -= 1

    def _take_waiting(self) -> EngineSequence | None:
        with self._lock:
            seq = self._inbox.popleft() if self._inbox else None
            self.metrics.queue_depth.labels(self.name).set(len(self._inbox))
        return seq

    def _stop(self, error: str | None = None) -> None:
        """End every sequence it holds (aborted on shutdown; with `error` when the engine failed) and detach."""
        reason, message = ("error", error) if error else ("abort", "server shutting down")
        self.batch.end_all(reason, message)
        while (waiting := self._take_waiting()) is not None:
            self.batch.finish(waiting, GenerationEvent("", [], [], reason, 0, message))
        self._stopped.set()
        self._ready.set()  # stopped or failed while warming up: nobody waits for it any longer
