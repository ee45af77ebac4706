"""The generation engine: continuous batching of every request to one variant in one batch, whose rows
with a deadline it would miss step apart from the rest while they need to (`TransformersEngine._regroup`).

Its prefill and decode steps run on the process's one compute thread (`compute.ComputeThread`), taking
turns with the other resident variants' engines; loading runs on a thread of its own, so a variant
loaded on demand does not stall the others' decoding. Requests reach the engine through a queue;
events come back to each request's asyncio queue.

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
import math
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
from slimserve.server.compute import BACKGROUND_S, SAFETY, ComputeThread, Turn
from slimserve.server.detokenize import IncrementalDetokenizer
from slimserve.server.kv_cache import growing_cache
from slimserve.server.metrics import ServerMetrics
from slimserve.server.router import LatencyProfile
from slimserve.server.sampling import Sampler, SamplingParams, TokenLogprob
from slimserve.server.structured import MASK_MS_PRIOR, GrammarCache, TokenMask

log = logging.getLogger(__name__)

HOLD_STEPS = 8
"""A row stepped apart for its deadline rejoins the whole batch once that batch's steps would leave it this
many steps to spare: without the margin it would move back and forth at the edge of its budget."""


WAIT_LIMIT_S = 10.0
"""A budgeted prompt waits at most this long (from its submission) for the spare time of running sequences
due before it (`TransformersEngine._in_spare_time`): past that it is prefilled even if they miss, so
steady tight traffic cannot starve a request that is past saving."""


PREFILL_TOKENS = 128
"""Prompt tokens one turn prefills: a longer prompt is prefilled in chunks of about this size, one per turn,
so the compute thread can give another engine's urgent steps a turn between them (a prefill cannot be
interrupted; chunked prefill as in vLLM and Sarathi-Serve). Each chunk costs one more forward's fixed
share, which is why the chunk is not smaller."""


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


def prompt_chunk(prompt: list[int], done: int) -> list[int]:
    """The tokens of the next chunk of `prompt` after the first `done` (`prefill_chunks`)."""
    start = 0
    for size in prefill_chunks(len(prompt)):
        if start >= done:
            return prompt[start : start + size]
        start += size
    return []


def prefill_chunks(prompt_tokens: int, per_turn: int = PREFILL_TOKENS) -> list[int]:
    """Chunk sizes of a prompt's prefill: as few chunks of at most `per_turn` as it needs, of equal size."""
    count = max(1, math.ceil(prompt_tokens / per_turn))
    size, extra = divmod(prompt_tokens, count)
    return [size + (i < extra) for i in range(count)]


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
        self.profile: LatencyProfile | None = None
        """Live latency profile the router reads; the compute thread feeds it prefill and step times."""
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
        """Urgent rows, stepped apart from the rest of the batch while their deadlines need it (`_regroup`)."""
        self._last_turn: dict[str, Any] = {}
        self._partial: _Partial | None = None
        """The sequence being prefilled chunk by chunk; it counts as running (a batch slot is its)."""
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

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state is EngineState.READY

    def _drain_s(self, count: int) -> float:
        """Predicted seconds until `count` admitted sequences have finished (a 429's Retry-After): running ones
        after their remaining steps, queued ones in order as slots free, at the measured step time of a full
        batch. Called with `_lock` held."""
        step_s = self._step_s(min(max(self._in_flight, 1), self.max_batch_size))
        running = [s.steps_left * step_s for s in self._running_rows() if not s.done]
        queued = [
            self._prefill_s(len(s.handle.prompt_ids), len(s.handle.prompt_ids)) + s.params.max_tokens * step_s
            for s in self._inbox
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

        Why in one step: the compute thread takes what waits at the start of each turn, and when a request's
        choices were queued one by one, the first was sometimes prefilled and stepped alone before the
        second came in. bf16 matmuls (here the MLP's down projection) and torch's fp32 attention kernel round
        a row's last bits differently at batch 1 than at 2, so the same seeded request with n=2 on an idle
        server drew other tokens in a third to half of the runs. Queued together, its choices start in the
        same turns every time."""
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
        return TokenMask(grammars.compile(params.constraint).grammar, vocab, grammars.observe_mask)

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
            self.state = EngineState.READY
            self._attached = True
        log.info("%s ready (loaded in %.1f s)", self.name, variant.load_seconds)
        self.compute.attach(self)
        self._ready.set()

    # ---- compute thread ----------------------------------------------------------------------------

    def step(self) -> bool:
        """One turn: admit and prefill waiting sequences into free slots, then one decode step (of the whole
        batch, or of its urgent rows alone: `_regroup`). True if it ran either, even when every row it
        stepped finished: a turn reported as idle leaves the engine out of the compute thread's turns until
        the next request arrives, and the rest of its batch (or its waiting queue) with it.

        A forward that raises fails the variant, not the server (as vLLM's engine core dies alone): every
        request it holds ends with the error, and the engine reports FAILED with the reason."""
        variant = self.variant
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
        """The rows to step this turn: the whole batch, or only those whose deadlines need its steps now.

        A row with a budget is urgent when the whole batch's steps (SAFETY times the step time of every
        running row) would no longer finish it in time, yet steps of its own still can. Urgent rows are
        split off and stepped alone while the rest of the batch waits, as a preemptive earliest-deadline
        scheduler would: a batch step costs more the more rows it serves (the int4 student's: 44 ms at one
        row, 126 at eight here), so a tight request that joins a busy batch misses at the batch's pace
        where it would have made it alone. Rows due before an urgent row step with it, whether urgent or
        not: in a routing run a loose request (128 tokens, 6.3 s left) stepped apart by urgency while a
        request with 15 tokens and 1.5 s left waited, fell past saving and took 2.9 s against a 1.9 s
        budget. Rows without a budget, or past saving, ride along once they have waited `BACKGROUND_S`,
        so they still finish. With nothing urgent, or everything, the rows are one batch again."""
        main, express = list(self._rows), list(self._express_rows)
        everyone = main + express
        if not everyone:
            return self._batch, self._rows
        full_s, alone_s = self._step_s(len(everyone)), self._step_s(1)

        def savable(seq: _Sequence) -> bool:
            """With a budget its own steps, stepped apart, can still meet."""
            deadline = seq.handle.deadline
            return deadline is not None and deadline - now >= seq.steps_left * alone_s

        def urgent(seq: _Sequence, margin_s: float) -> bool:
            if not savable(seq):
                return False
            deadline = seq.handle.deadline or 0.0  # set: savable
            return deadline - seq.steps_left * full_s * SAFETY <= now + margin_s

        hurry = [s for s in express if urgent(s, HOLD_STEPS * full_s)] + [s for s in main if urgent(s, 0.0)]
        if hurry:  # earliest deadline first: rows due before an urgent row step with it, while they can make it
            last_due = max(s.handle.deadline or 0.0 for s in hurry)
            hurry += [s for s in everyone if s not in hurry and savable(s) and (s.handle.deadline or 0.0) <= last_due]
        if not hurry or len(hurry) == len(everyone):
            if express:
                self._batch.merge(self._express)
                self._express = PaddedKVBatch()
                self._rows, self._express_rows = main + express, []
            return self._batch, self._rows

        def in_background(seq: _Sequence) -> bool:
            """Without a budget or past saving, and not stepped for `BACKGROUND_S`."""
            return not savable(seq) and seq.last_token_at is not None and now - seq.last_token_at >= BACKGROUND_S

        chosen = set(hurry) | {s for s in everyone if in_background(s)}
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
        """How urgently this engine needs its next turn (see `compute`); None when it has nothing to do.

        A waiting sequence counts like a running one whose work ahead is its prefill and every token: one
        without a budget (or cancelled) is prefilled at once, one with a budget when its deadline needs it,
        so a loose request's prefill does not cut into a tight request's steps on another engine."""
        if self.state is not EngineState.READY or self.variant is None:
            return Turn(step_s=0.0, prefill=True)  # stopping: one more turn aborts what is left and detaches
        rows = [s for s in self._running_rows() if not s.done]
        admissible = self._admissible(rows)
        if not rows and not admissible:
            return None
        now = time.perf_counter()
        latest: float | None = None
        deadline: float | None = None
        best_effort = past_saving = False
        # a prompt under way in chunks is not a prefill that comes first: its next chunk takes the turn of a
        # running sequence, so budgeted work due before it gets turns between its chunks
        prefill_now = any(s.handle.deadline is None or s.handle.cancelled.is_set() for s in admissible)
        work = [(s, False) for s in rows] + [(s, True) for s in admissible if s.handle.deadline is not None]
        for seq, waiting in work:
            start = self._latest_start(seq, len(rows), now, waiting)
            if start is None:
                best_effort = True
            elif start == math.inf:
                past_saving = True
            else:
                latest = start if latest is None else min(latest, start)
                due = seq.handle.deadline  # set: a sequence without one has no latest start
                if due is not None:
                    deadline = due if deadline is None else min(deadline, due)
        step_s = self._step_s(len(rows))
        return Turn(
            step_s,
            prefill=prefill_now,
            latest_start=latest,
            deadline=deadline,
            best_effort=best_effort,
            past_saving=past_saving,
            cost_s=(step_s if rows else 0.0) + self._next_prefill_s(admissible),
        )

    def _next_prefill_s(self, admissible: list[_Sequence]) -> float:
        """Predicted seconds of the prefill the next turn runs (`_admit`): the next chunk of the prompt under
        way if it fits, else the first chunks of waiting prompts up to `PREFILL_TOKENS`."""
        partial = self._partial
        if partial is not None:
            ahead = self._ahead_of(partial)
            if ahead is not None:  # its whole (one-chunk) prompt
                return self._prefill_s(len(ahead.handle.prompt_ids), len(ahead.handle.prompt_ids))
            prompt = partial.seq.handle.prompt_ids
            if not self._next_chunk_fits(partial):
                return 0.0
            return self._prefill_s(len(prompt), len(prompt_chunk(prompt, partial.done)))
        seconds, spent = 0.0, 0
        for seq in admissible:
            prompt = seq.handle.prompt_ids
            first = prefill_chunks(len(prompt))[0]
            if spent and spent + first > PREFILL_TOKENS:
                break
            seconds += self._prefill_s(len(prompt), first)
            spent += first
            if first < len(prompt):  # it stays under way: the turn prefills nothing else
                break
        return seconds

    def _step_s(self, batch: int) -> float:
        return self.profile.step_ms(batch) / 1000 if self.profile is not None else 0.05

    def _latest_start(self, seq: _Sequence, running: int, now: float, waiting: bool = False) -> float | None:
        """`time.perf_counter()` by which `seq`'s work ahead (its prefill if waiting, then its remaining
        steps, planned at `SAFETY` times their predicted length) must start to meet its deadline; None
        without a budget, inf once not even that work alone fits (past saving).

        Its steps are planned at its batch's pace while that still fits, else at its own: `_regroup` then
        steps it apart from the rest. Judged at the batch's pace alone, a tight request on a busy engine
        counted as past saving, so the compute thread gave its engine only background turns while another
        engine had budgeted work, though stepped apart it could still have made it."""
        deadline = seq.handle.deadline
        if deadline is None:
            return None
        partial = self._partial
        if waiting or (partial is not None and seq is partial.seq):
            prompt = len(seq.handle.prompt_ids)
            first_s = self.profile.ttft_ms(prompt) / 1000 if self.profile is not None else 0.05
            if not waiting:  # under way in chunks: what is left of its prompt, in a batch slot already its
                assert partial is not None
                first_s *= (prompt - partial.done) / prompt
            steps, batch = seq.params.max_tokens, running + (1 if waiting else 0)
        else:
            first_s, steps, batch = 0.0, seq.steps_left, running
        ahead_s = first_s + steps * self._step_s(batch)
        if deadline - now < ahead_s:
            ahead_s = first_s + steps * self._step_s(1)
            if deadline - now < ahead_s:
                return math.inf
        return deadline - ahead_s * SAFETY

    def _admissible(self, rows: list[_Sequence]) -> list[_Sequence]:
        """Waiting sequences to prefill in this engine's next turn: as many as free slots take, except that a
        budgeted one joins only when its first chunk fits before the latest start of every running sequence
        it must not delay (`_in_spare_time`); those without a budget, or cancelled, join at once."""
        with self._lock:
            waiting = list(self._inbox)[: max(0, self.max_batch_size - len(rows))]
        if not waiting:
            return []
        now = time.perf_counter()
        admitted, spent_s = [], 0.0
        for seq in waiting:
            if seq.handle.deadline is None or seq.handle.cancelled.is_set():
                admitted.append(seq)
                continue
            prompt = seq.handle.prompt_ids
            chunk_s = self._prefill_s(len(prompt), prefill_chunks(len(prompt))[0])
            if self._in_spare_time(seq, rows, now, spent_s + chunk_s, waiting=True):
                admitted.append(seq)
                spent_s += chunk_s
        return admitted

    def _prefill_s(self, prompt_tokens: int, chunk_tokens: int) -> float:
        """Predicted seconds of a `chunk_tokens` chunk of a prompt of `prompt_tokens` (its share of the TTFT)."""
        whole_s = self.profile.ttft_ms(prompt_tokens) / 1000 if self.profile is not None else 0.05
        return whole_s * chunk_tokens / max(prompt_tokens, 1)

    def _in_spare_time(self, seq: _Sequence, rows: list[_Sequence], now: float, cost_s: float, waiting: bool) -> bool:
        """Whether `cost_s` of `seq`'s prefill (planned at `SAFETY` times) can run now without delaying a
        running sequence it must yield to past that sequence's latest start: one with a budget it can still
        meet, due no later than `seq` (earliest deadline first), or any such one if `seq` is past saving (it
        yields to all saveable work, as its decode steps do), or if it has waited `WAIT_LIMIT_S` already.

        A prefill cannot be interrupted: in a routing run a hopeless request's 276-token prompt (three
        chunks of 0.4 s) was prefilled into the turns of a running request with 0.6 s to spare, which then
        missed its budget by 0.8 s."""
        if now - seq.submitted_at >= WAIT_LIMIT_S:
            return True
        own = self._latest_start(seq, len(rows), now, waiting)
        deadline = seq.handle.deadline
        limits = []
        for other in rows:
            if other is seq or other.done or other.handle.deadline is None:
                continue
            start = self._latest_start(other, len(rows), now)
            if start is None or start == math.inf:  # past saving: it yields to everyone
                continue
            if own == math.inf or deadline is None or other.handle.deadline <= deadline:
                limits.append(start)
        return not limits or now + cost_s * SAFETY <= min(limits)

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

    def _admit(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]) -> bool:
        """Prefill into free batch slots, up to `PREFILL_TOKENS` prompt tokens this turn: first the next chunk
        of a prompt under way, then waiting sequences, whose prompts start in this turn only while what it
        prefilled leaves room for their first chunk. True if it prefilled or took anything from the queue."""
        spent = 0
        if self._partial is not None:
            ahead = self._ahead_of(self._partial)
            if ahead is not None:  # due sooner: its whole prompt this turn, the chunks under way wait
                under_way, self._partial = self._partial, None
                self._start_prefill(variant, ahead, batch, rows, eos)
                self._partial = under_way
                return True
            if not self._next_chunk_fits(self._partial):  # running sequences due first need this turn
                return False
            spent = self._prefill_chunk(variant, self._partial, batch, rows, eos)
            if self._partial is not None:  # not done yet: its chunk was this turn's prefill
                return True
        taken = spent > 0
        for seq in self._admissible(self._running_rows()):
            first = prefill_chunks(len(seq.handle.prompt_ids))[0]
            if spent and spent + first > PREFILL_TOKENS:
                break
            taken = True
            spent += self._start_prefill(variant, seq, batch, rows, eos)
            if self._partial is not None:
                break
        return taken

    def _next_chunk_fits(self, partial: _Partial) -> bool:
        """Whether the next chunk of the prompt under way runs this turn: always without a budget, else when
        it fits the spare time of the running sequences it yields to (`_in_spare_time`)."""
        seq = partial.seq
        if seq.handle.deadline is None or seq.handle.cancelled.is_set():
            return True
        prompt = seq.handle.prompt_ids
        chunk_s = self._prefill_s(len(prompt), len(prompt_chunk(prompt, partial.done)))
        return self._in_spare_time(seq, self._running_rows(), time.perf_counter(), chunk_s, waiting=False)

    def _ahead_of(self, partial: _Partial) -> _Sequence | None:
        """A waiting sequence to prefill before the next chunk of the prompt under way: the admissible one
        due soonest, if it is due before that prompt's deadline and its prompt is one chunk.

        Earliest deadline first, as between engines: in a routing run a 45-token request with an 837 ms
        budget arrived during the first of a 205-token prompt's two chunks (0.34 s each) on the same engine,
        waited for the second, and missed by 0.6 s. A longer prompt does not jump: then two prompts would
        be under way at once."""
        due = partial.seq.handle.deadline
        sooner = [
            s
            for s in self._admissible(self._running_rows())
            if s.handle.deadline is not None
            and (due is None or s.handle.deadline < due)
            and len(s.handle.prompt_ids) <= PREFILL_TOKENS
            and not s.handle.cancelled.is_set()
        ]
        return min(sooner, key=lambda s: s.handle.deadline or 0.0, default=None)

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
        logits = self._prefill(variant, partial.cache, chunk)
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
        self._emit([(seq, logits[0])], eos)
        if not seq.done:
            batch.add(partial.cache)
            rows.append(seq)
        return len(chunk)

    def _prefill(self, variant: LoadedVariant, cache: DynamicCache, chunk: list[int]) -> torch.Tensor:
        """One chunk of a prompt into `cache`, after the tokens it holds (positions follow from its length)."""
        input_ids = torch.tensor([chunk], dtype=torch.long)  # (1, T)
        out = variant.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # (1, vocab)

    def _decode_step(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[_Sequence], eos: set[int]) -> None:
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


def _put_all(items: list[tuple[RequestHandle, GenerationEvent]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
