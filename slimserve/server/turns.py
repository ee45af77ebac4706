"""What one turn of a transformers engine does to its running batch: the scheduler's plan carried out on the
model. It prefills what `Scheduler.schedule_prefill` chose (whole prompts, or the next chunk of the one under
way), regroups the rows as `Scheduler.schedule_decode` says, steps them once, samples a token per row, and
finishes, accounts and compacts the rows that are done.

Why a module of its own: the engine (`engine.py`) is a variant's life and its face to the layers above:
loading, the paced warm-up, admission into its queue, shutdown and failure. The turns are a different
concept with state of their own (the batch, the prompt under way, the record of the last turn), and run only
on the compute thread; they reach the engine's queue through `AdmissionQueue` alone.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from slimserve.models.loader import LoadedVariant
from slimserve.server.batch import PaddedKVBatch, SplitBatch
from slimserve.server.forward import prefill_forward, step_forward
from slimserve.server.kv_cache import growing_cache
from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import sample_rows
from slimserve.server.scheduler import Scheduler, prompt_chunk
from slimserve.server.sequence import EngineSequence, PartialPrefill
from slimserve.server.serving_engine import GenerationEvent, RequestHandle, deliver


class AdmissionQueue(Protocol):
    """The engine's queue of admitted sequences as a turn reaches it (the engine guards it with its lock)."""

    def queued(self) -> list[EngineSequence]:
        """The sequences waiting for a batch slot, oldest first (a snapshot)."""
        ...

    def dequeue(self, seq: EngineSequence) -> None:
        """Take `seq` from the queue: its prefill starts."""
        ...

    def retire(self, seq: EngineSequence) -> None:
        """`seq` has finished: it no longer counts against admission."""
        ...


class RunningBatch:
    """An engine's running batch (with its urgent rows stepped apart) and the prompt being prefilled in chunks,
    advanced one turn at a time on the compute thread."""

    def __init__(self, name: str, metrics: ServerMetrics, scheduler: Scheduler[EngineSequence], queue: AdmissionQueue):
        self.name = name
        self.metrics = metrics
        self.scheduler = scheduler
        """Plans each turn; the batch carries its plans out."""
        self.queue = queue
        self.split: SplitBatch[EngineSequence] = SplitBatch()
        """The running batch, and its urgent rows stepped apart while their deadlines need it."""
        self.partial: PartialPrefill | None = None
        """The sequence being prefilled chunk by chunk; it counts as running (a batch slot is its)."""
        self.last_turn: dict[str, Any] = {}
        """Its last turn's prefills and stepped rows, for the compute thread's trace (`engine.last_turn`)."""

    def rows(self) -> list[EngineSequence]:
        """Every sequence in either batch, and the one being prefilled in chunks (a snapshot: the compute
        thread may move rows meanwhile)."""
        partial = self.partial
        return self.split.rows() + ([partial.seq] if partial is not None else [])

    def partial_state(self) -> tuple[EngineSequence, int] | None:
        """The prompt under way and how many of its tokens are in its cache, as the scheduler takes it."""
        partial = self.partial
        return (partial.seq, partial.done) if partial is not None else None

    def turn(self, variant: LoadedVariant) -> bool:
        """Prefill what the plan admits, then one decode step; True if it did either."""
        eos = variant.eos_token_ids
        self.last_turn = {"prefills": []}
        admitted = self._admit(variant, self.split.main, self.split.main_rows, eos)
        self._drop_cancelled()
        batch, rows = self._regroup(time.perf_counter())
        stepped = bool(rows)  # before the step: finished rows leave `rows` (`_compact`)
        if rows:
            self.last_turn.update(
                rows=[s.handle.request_id for s in rows],
                apart=batch is self.split.apart,
                batch=self.split.count,
            )
            self._decode_step(variant, batch, rows, eos)
        self.metrics.running.labels(self.name).set(self.split.count)
        return admitted or stepped

    def end_all(self, reason: str, message: str) -> None:
        """End every sequence it holds with `reason` and empty the batch (the engine stops or failed)."""
        for seq in self.rows():
            if not seq.done:
                self.finish(seq, GenerationEvent("", [], [], reason, len(seq.generated), message))
        self.partial = None
        self.split = SplitBatch()

    def finish(self, seq: EngineSequence, event: GenerationEvent) -> None:
        """End `seq` with `event` outside a step (cancelled, aborted, failed)."""
        seq.done = True
        self._account(seq)
        deliver([(seq.handle, event)])

    def _regroup(self, now: float) -> tuple[PaddedKVBatch, list[EngineSequence]]:
        """Carry out the scheduler's decode plan (`Scheduler.schedule_decode`): the batch and rows to step,
        moving rows between the main batch and the one stepped apart."""
        apart = self.scheduler.schedule_decode(list(self.split.main_rows), list(self.split.apart_rows), now)
        return self.split.regroup(apart)

    def _drop_cancelled(self) -> None:
        """Finish the cancelled rows of both batches (a waiting batch would otherwise keep them)."""
        for batch, rows in self.split.pairs():
            cancelled = [s for s in rows if s.handle.cancelled.is_set()]
            for seq in cancelled:
                self.finish(seq, GenerationEvent("", [], [], "abort", len(seq.generated)))
            if cancelled:
                self._compact(batch, rows)

    def _admit(self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[EngineSequence], eos: set[int]) -> bool:
        """Carry out the scheduler's prefill plan (`Scheduler.schedule_prefill`). True if it prefilled or took
        anything from the queue."""
        plan = self.scheduler.schedule_prefill(
            self.queue.queued(), self.rows(), self.partial_state(), time.perf_counter()
        )
        if plan.jump is not None:  # due sooner: its whole prompt this turn, the chunks under way wait
            under_way, self.partial = self.partial, None
            self._start_prefill(variant, plan.jump, batch, rows, eos)
            self.partial = under_way
            return True
        if plan.chunk and self.partial is not None:
            self._prefill_chunk(variant, self.partial, batch, rows, eos)
        for seq in plan.start:
            self._start_prefill(variant, seq, batch, rows, eos)
        return not plan.empty

    def _start_prefill(
        self,
        variant: LoadedVariant,
        seq: EngineSequence,
        batch: PaddedKVBatch,
        rows: list[EngineSequence],
        eos: set[int],
    ) -> int:
        """Take `seq` from the queue and prefill its first chunk (it becomes the prompt under way if it has
        more); tokens prefilled returned."""
        self.queue.dequeue(seq)
        if seq.handle.cancelled.is_set():
            self.finish(seq, GenerationEvent("", [], [], "abort", 0))
            return 0
        deadline = seq.handle.deadline
        partial = PartialPrefill(
            seq,
            growing_cache(variant.model.config),
            left_s=round(deadline - time.perf_counter(), 4) if deadline is not None else None,
        )
        self.partial = partial
        return self._prefill_chunk(variant, partial, batch, rows, eos)

    def _prefill_chunk(
        self,
        variant: LoadedVariant,
        partial: PartialPrefill,
        batch: PaddedKVBatch,
        rows: list[EngineSequence],
        eos: set[int],
    ) -> int:
        """The next chunk of `partial`'s prompt (tokens prefilled returned); once the prompt is in, its first
        token is sampled and it joins the batch."""
        seq, prompt = partial.seq, partial.seq.handle.prompt_ids
        if seq.handle.cancelled.is_set():
            self.partial = None
            self.finish(seq, GenerationEvent("", [], [], "abort", 0))
            return 0
        chunk = prompt_chunk(prompt, partial.done)
        began = time.perf_counter()
        logits = prefill_forward(variant.model, partial.cache, chunk)
        partial.seconds += time.perf_counter() - began
        partial.done += len(chunk)
        last = partial.done >= len(prompt)
        self.last_turn.setdefault("prefills", []).append(
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
        self.partial = None
        self.scheduler.update_from_output(prompt_tokens=len(prompt), prefill_s=partial.seconds)
        self._emit([seq], logits, eos)
        if not seq.done:
            batch.add(partial.cache)
            rows.append(seq)
        return len(chunk)

    def _decode_step(
        self, variant: LoadedVariant, batch: PaddedKVBatch, rows: list[EngineSequence], eos: set[int]
    ) -> None:
        input_ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long)  # (B, 1)
        began = time.perf_counter()
        logits = step_forward(variant.model, batch, input_ids)
        self._emit(rows, logits, eos)
        # the whole step as a client sees it: forward, sampling, delivery
        self.scheduler.update_from_output(rows=len(rows), step_s=time.perf_counter() - began)
        if any(s.done for s in rows):
            self._compact(batch, rows)

    def _compact(self, batch: PaddedKVBatch, rows: list[EngineSequence]) -> None:
        keep = [i for i, s in enumerate(rows) if not s.done]
        batch.keep(keep)
        rows[:] = [rows[i] for i in keep]

    def _emit(self, stepped: list[EngineSequence], logits: torch.Tensor, eos: set[int]) -> None:
        """Sample one token per sequence from its row of `logits` (B, vocab), detokenize, decide whether it
        finished, deliver the events."""
        now = time.perf_counter()
        deliveries: list[tuple[RequestHandle, GenerationEvent]] = []
        for seq, (token, logprob) in zip(stepped, sample_rows([s.sampler for s in stepped], logits), strict=True):
            if seq.last_token_at is None:
                self.metrics.ttft.labels(self.name).observe(now - seq.submitted_at)
            else:
                self.metrics.tpot.labels(self.name).observe(now - seq.last_token_at)
            seq.last_token_at = now
            event = seq.take(token, logprob, eos)
            if seq.done:
                self._account(seq)
            deliveries.append((seq.handle, event))
        deliver(deliveries)

    def _account(self, seq: EngineSequence) -> None:
        if seq.accounted:
            return
        seq.accounted = True
        self.queue.retire(seq)
        self.metrics.prompt_tokens.labels(self.name).inc(len(seq.handle.prompt_ids))
        self.metrics.completion_tokens.labels(self.name).inc(len(seq.generated))
