"""The scheduler: what an engine's next turn does, and which engine's turn it is, decided from the queue,
the running rows, the variants' cost profiles and a clock passed in. No torch, no threads: an engine
executes its plans (`schedule_prefill`, then `schedule_decode`, as vLLM's `schedule()` returns a plan
the model runner carries out), and the compute thread asks `next_turn` whose turn comes next. The
router's predictions (`predictions.py`) plan with the same `savable` test of whether a sequence can
still make its deadline. Tests drive it with a fake clock.

Within an engine, earliest deadline first: rows whose deadline the whole batch's steps would miss step
apart from the rest while they need to (`schedule_decode`); prompts are prefilled a chunk of
`PREFILL_TOKENS` per turn, a short one due sooner between another's chunks (`ahead_of`). Between engines
(`next_turn`): prefills without a budget first, then the engine due first by deadline, with paced work
(no budget, or past saving) going between while the budgeted work can wait.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from slimserve.server.profile import CostProfile

BACKGROUND_S = 1.0
"""A sequence past saving (it will miss its budget whatever runs) steps at least this often; otherwise only
when no other engine is due sooner, so it stops taking the cores from requests that can still make it."""

SAFETY = 1.25
"""A budgeted sequence's remaining steps are planned at this multiple of its engine's step time: turns
of other engines (prefills, steps already under way) interleave with its own near its due time."""

PREFILL_TOKENS = 128
"""Prompt tokens one turn prefills: a longer prompt is prefilled in chunks of about this size, one per turn,
so the compute thread can give another engine's urgent steps a turn between them (a prefill cannot be
interrupted; chunked prefill as in vLLM and Sarathi-Serve). Each chunk costs one more forward's fixed
share, which is why the chunk is not smaller."""

UNPROFILED_S = 0.05
"""Seconds assumed for a step or a prefill of an engine that has no profile yet."""


def savable(left_s: float, steps: int, step_alone_s: float, first_s: float = 0.0) -> bool:
    """Whether `first_s` of prefill and then `steps` decode steps at batch one (`step_alone_s` each) end
    within `left_s`: the one test of whether a sequence can still make its deadline, stepped apart from
    the rest of its batch. A sequence that fails it is past saving and yields to all other work."""
    return left_s >= first_s + steps * step_alone_s


def prefill_chunks(prompt_tokens: int, per_turn: int = PREFILL_TOKENS) -> list[int]:
    """Chunk sizes of a prompt's prefill: as few chunks of at most `per_turn` as it needs, of equal size."""
    count = max(1, math.ceil(prompt_tokens / per_turn))
    size, extra = divmod(prompt_tokens, count)
    return [size + (i < extra) for i in range(count)]


def prompt_chunk(prompt: list[int], done: int) -> list[int]:
    """The tokens of the next chunk of `prompt` after the first `done` (`prefill_chunks`)."""
    start = 0
    for size in prefill_chunks(len(prompt)):
        if start >= done:
            return prompt[start : start + size]
        start += size
    return []


def next_chunk_tokens(prompt_tokens: int, done: int) -> int:
    """Tokens of the chunk after the first `done` of a prompt of `prompt_tokens`."""
    start = 0
    for size in prefill_chunks(prompt_tokens):
        if start >= done:
            return size
        start += size
    return 0


class Job(Protocol):
    """A sequence as the scheduler sees it (the engine's sequences provide it; tests use plain records)."""

    @property
    def deadline(self) -> float | None:
        """On the scheduler's clock; None without a latency budget."""
        ...

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def steps_left(self) -> int: ...
    @property
    def submitted_at(self) -> float: ...
    @property
    def last_token_at(self) -> float | None: ...
    @property
    def cancelled(self) -> bool: ...
    @property
    def done(self) -> bool: ...


J = TypeVar("J", bound=Job)


@dataclass(frozen=True)
class Turn:
    """What an engine has to do, for the choice of which engine steps next."""

    step_s: float
    """Predicted seconds of its next decode step."""
    prefill: bool = False
    """Sequences without a budget wait for admission (or the engine is stopping): step as soon as possible."""
    latest_start: float | None = None
    """Clock time by which its next step must start so that its budgeted sequences still finish on time
    (None: none that can still make it)."""
    deadline: float | None = None
    """The earliest deadline of those budgeted sequences: the earliest-deadline-first order among engines."""
    best_effort: bool = False
    """It runs sequences without a budget: they advance at the round-robin pace."""
    past_saving: bool = False
    """It runs sequences that will miss their budgets whatever runs: they advance in the background."""
    cost_s: float = 0.0
    """Predicted seconds of the whole turn: its decode step and the prefill chunk it would run. Paced work
    goes ahead of budgeted work only when all of this fits before the budgeted work's latest start."""


@dataclass
class PrefillPlan(Generic[J]):
    """The prefill of an engine's next turn."""

    jump: J | None = None
    """A one-chunk prompt due before the prompt under way: prefilled whole first, the chunks wait."""
    chunk: bool = False
    """The next chunk of the prompt under way runs."""
    start: list[J] = field(default_factory=list)
    """Waiting prompts whose first chunk runs (or, cancelled, that leave the queue), in this order."""
    seconds: float = 0.0
    """Predicted seconds of all of it."""

    @property
    def empty(self) -> bool:
        return self.jump is None and not self.chunk and not self.start


def paced(turn: Turn, last_ran: float, busy_engines: int) -> float:
    """When this engine's sequences without a budget, or past saving, are due their next step (inf: none)."""
    candidates = [math.inf]
    if turn.best_effort:  # the round-robin pace: once per round of every busy engine's step
        candidates.append(last_ran + turn.step_s * busy_engines)
    if turn.past_saving:
        candidates.append(last_ran + BACKGROUND_S)
    return min(candidates)


def next_turn(turns: Sequence[Turn], last_ran: Sequence[float], now: float) -> int:
    """Index of the engine to step next: prefills without a budget first, then the budgeted engine due
    first by deadline, unless paced work is due before every budgeted engine's latest start and its whole
    turn (`Turn.cost_s`, at `SAFETY`) still ends by then; among equals, the engine that has waited longest.

    The turn's length matters because a paced turn may carry a prefill chunk longer than the time a
    budgeted request has to spare."""
    prefills = [i for i, turn in enumerate(turns) if turn.prefill]
    if prefills:
        return min(prefills, key=lambda i: last_ran[i])
    starts = {i: turn.latest_start for i, turn in enumerate(turns) if turn.latest_start is not None}
    pace = [paced(turn, last_ran[i], len(turns)) for i, turn in enumerate(turns)]
    earliest_pace = min(range(len(turns)), key=lambda i: (pace[i], last_ran[i]))
    if not starts:
        return earliest_pace
    first_start = min(starts.values())
    if pace[earliest_pace] < first_start and now + turns[earliest_pace].cost_s * SAFETY <= first_start:
        return earliest_pace
    return min(starts, key=lambda i: (_or_inf(turns[i].deadline), last_ran[i]))


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


class Scheduler(Generic[J]):
    """One engine's turns: which prompt chunk to prefill, which rows step, who waits, what is past saving.

    The engine passes what it holds: `waiting` (its queue, oldest first), `rows` (the sequences holding a
    batch slot: both row groups and the prompt under way), `partial` (the prompt under way in chunks, and
    how many of its tokens are in its cache) and `now`, on the same clock as the jobs' deadlines."""

    def __init__(self, max_batch_size: int, profile: CostProfile | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.profile = profile
        """The engine's live cost profile (the pool assigns it): read by every plan, taught by
        `update_from_output`."""

    def update_from_output(
        self, rows: int = 0, step_s: float | None = None, prompt_tokens: int = 0, prefill_s: float | None = None
    ) -> None:
        """What a planned turn cost, from whoever carried it out (the engine; the simulator): a decode step of
        `rows` rows in `step_s`, a whole prompt of `prompt_tokens` prefilled in `prefill_s` (learned once, at its
        last chunk). The live profile learns it, as vLLM's scheduler takes a step's results back."""
        if self.profile is None:
            return
        if prefill_s is not None:
            self.profile.observe_prefill(prompt_tokens, prefill_s)
        if step_s is not None and rows:
            self.profile.observe_step(rows, step_s)

    # ---- costs -----------------------------------------------------------------------------------

    def step_s(self, batch: int) -> float:
        return self.profile.step_ms(batch) / 1000 if self.profile is not None else UNPROFILED_S

    def prefill_s(self, prompt_tokens: int, chunk_tokens: int) -> float:
        """Predicted seconds of a `chunk_tokens` chunk of a prompt of `prompt_tokens` (its share of the TTFT)."""
        whole_s = self.profile.ttft_ms(prompt_tokens) / 1000 if self.profile is not None else UNPROFILED_S
        return whole_s * chunk_tokens / max(prompt_tokens, 1)

    # ---- deadlines -------------------------------------------------------------------------------

    def latest_start(
        self, job: J, running: int, now: float, waiting: bool = False, partial_done: int | None = None
    ) -> float | None:
        """Clock time by which `job`'s work ahead (its prefill if waiting or under way, `partial_done` of its
        prompt tokens already in; then its remaining steps, planned at `SAFETY` times their predicted
        length) must start to meet its deadline; None without a budget, inf once not even that work alone
        fits (past saving).

        Its steps are planned at its batch's pace while that still fits, else at its own: `schedule_decode`
        then steps it apart from the rest. Judged at the batch's pace alone, a tight request on a busy engine
        would count as past saving and get only background turns, though stepped apart it can still make it."""
        deadline = job.deadline
        if deadline is None:
            return None
        if waiting or partial_done is not None:
            prompt = job.prompt_tokens
            first_s = self.prefill_s(prompt, prompt)
            if not waiting:  # under way in chunks: what is left of its prompt, in a batch slot already its
                first_s *= (prompt - (partial_done or 0)) / max(prompt, 1)
            steps, batch = job.max_tokens, running + (1 if waiting else 0)
        else:
            first_s, steps, batch = 0.0, job.steps_left, running
        ahead_s = first_s + steps * self.step_s(batch)
        if deadline - now < ahead_s:
            if not savable(deadline - now, steps, self.step_s(1), first_s):
                return math.inf
            ahead_s = first_s + steps * self.step_s(1)
        return deadline - ahead_s * SAFETY

    def savable(self, job: J, now: float) -> bool:
        """A running row with a budget that its own steps, stepped apart, can still meet."""
        return job.deadline is not None and savable(job.deadline - now, job.steps_left, self.step_s(1))

    @staticmethod
    def _done_of(job: J, partial: tuple[J, int] | None) -> int | None:
        return partial[1] if partial is not None and partial[0] is job else None

    # ---- prefill ---------------------------------------------------------------------------------

    def admissible(self, waiting: Sequence[J], rows: Sequence[J]) -> list[J]:
        """Waiting sequences to prefill in this engine's next turn: as many as free slots take, oldest first.
        A budgeted prompt does not wait for the spare time of rows due before it: switched off over the
        simulator's grid, that wait raised attainment (docs/BENCHMARKS.md, Routing on the simulator)."""
        return list(waiting)[: max(0, self.max_batch_size - len(rows))]

    def schedule_prefill(
        self, waiting: Sequence[J], rows: Sequence[J], partial: tuple[J, int] | None, now: float
    ) -> PrefillPlan[J]:
        """The prefill of the next turn, up to `PREFILL_TOKENS` prompt tokens: first a one-chunk prompt due
        before the prompt under way (`ahead_of`), else the next chunk of that prompt; then, once no prompt
        is under way, waiting prompts while what the turn prefills leaves room for their first chunk (a
        prompt longer than a chunk ends the turn's list: it stays under way)."""
        plan: PrefillPlan[J] = PrefillPlan()
        spent = 0
        if partial is not None:
            job, done = partial
            ahead = self.ahead_of(job, waiting, rows)
            if ahead is not None:
                plan.jump = ahead
                plan.seconds = self.prefill_s(ahead.prompt_tokens, ahead.prompt_tokens)
                return plan
            spent = next_chunk_tokens(job.prompt_tokens, done)
            plan.chunk, plan.seconds = True, self.prefill_s(job.prompt_tokens, spent)
            if done + spent < job.prompt_tokens:  # not done yet: its chunk is this turn's prefill
                return plan
        for job in self.admissible(waiting, rows):
            if job.cancelled:  # leaves the queue, prefilling nothing
                plan.start.append(job)
                continue
            first = prefill_chunks(job.prompt_tokens)[0]
            if spent and spent + first > PREFILL_TOKENS:
                break
            plan.start.append(job)
            spent += first
            plan.seconds += self.prefill_s(job.prompt_tokens, first)
            if first < job.prompt_tokens:  # it stays under way: the turn prefills nothing else
                break
        return plan

    def ahead_of(self, under_way: J, waiting: Sequence[J], rows: Sequence[J]) -> J | None:
        """A waiting sequence to prefill before the next chunk of the prompt under way: the admissible one
        due soonest, if it is due before that prompt's deadline and its prompt is one chunk.

        Earliest deadline first, as between engines: a short request due soon should not wait for every
        chunk of a long prompt. A longer prompt does not jump: then two prompts would be under way at once."""
        due = under_way.deadline
        sooner = [
            j
            for j in self.admissible(waiting, rows)
            if j.deadline is not None
            and (due is None or j.deadline < due)
            and j.prompt_tokens <= PREFILL_TOKENS
            and not j.cancelled
        ]
        return min(sooner, key=lambda j: j.deadline or 0.0, default=None)

    # ---- decode ----------------------------------------------------------------------------------

    def schedule_decode(self, main: Sequence[J], apart: Sequence[J], now: float) -> list[J] | None:
        """The rows to step this turn apart from the rest (None: the whole batch, as one), given last turn's
        two row groups (the main batch and the rows stepped apart; together every running row).

        A row with a budget is urgent when the whole batch's steps (SAFETY times the step time of every
        running row) would no longer finish it in time, yet steps of its own still can. Urgent rows are
        split off and stepped alone while the rest of the batch waits, as a preemptive earliest-deadline
        scheduler would: a batch step costs more the more rows it serves, so a tight request that joins a
        busy batch misses at the batch's pace where it would have made it alone. Rows due before an urgent
        row step with it, whether urgent or not: urgency alone would step a loose long request apart while
        a short one due sooner waits and falls past saving. Rows without a budget, or past saving, ride along
        once they have waited `BACKGROUND_S`, so they still finish. With nothing urgent, or everything, the
        rows are one batch again."""
        everyone = [*main, *apart]
        if not everyone:
            return None
        full_s = self.step_s(len(everyone))

        def urgent(job: J) -> bool:
            if not self.savable(job, now):
                return False
            deadline = job.deadline or 0.0  # set: savable
            return deadline - job.steps_left * full_s * SAFETY <= now

        hurry = [j for j in everyone if urgent(j)]
        if hurry:  # earliest deadline first: rows due before an urgent row step with it, while they can make it
            last_due = max(j.deadline or 0.0 for j in hurry)
            hurry += [
                j for j in everyone if j not in hurry and self.savable(j, now) and (j.deadline or 0.0) <= last_due
            ]
        if not hurry or len(hurry) == len(everyone):
            return None

        def in_background(job: J) -> bool:
            """Without a budget or past saving, and not stepped for `BACKGROUND_S`."""
            stepped = job.last_token_at
            return not self.savable(job, now) and stepped is not None and now - stepped >= BACKGROUND_S

        return [j for j in everyone if j in hurry or in_background(j)]

    # ---- the engine's urgency --------------------------------------------------------------------

    def turn(self, waiting: Sequence[J], rows: Sequence[J], partial: tuple[J, int] | None, now: float) -> Turn | None:
        """How urgently this engine needs its next turn (for `next_turn`); None when it has nothing to do.

        A waiting sequence counts like a running one whose work ahead is its prefill and every token: one
        without a budget (or cancelled) is prefilled at once, one with a budget when its deadline needs it,
        so a loose request's prefill does not cut into a tight request's steps on another engine."""
        live = [j for j in rows if not j.done]
        admissible = self.admissible(waiting, live)
        if not live and not admissible:
            return None
        latest: float | None = None
        deadline: float | None = None
        best_effort = past_saving = False
        # a prompt under way in chunks is not a prefill that comes first: its next chunk takes the turn of a
        # running sequence, so budgeted work due before it gets turns between its chunks
        prefill_now = any(j.deadline is None or j.cancelled for j in admissible)
        work = [(j, False) for j in live] + [(j, True) for j in admissible if j.deadline is not None]
        for job, is_waiting in work:
            start = self.latest_start(job, len(live), now, is_waiting, self._done_of(job, partial))
            if start is None:
                best_effort = True
            elif start == math.inf:
                past_saving = True
            else:
                latest = start if latest is None else min(latest, start)
                if job.deadline is not None:
                    deadline = job.deadline if deadline is None else min(deadline, job.deadline)
        step_s = self.step_s(len(live))
        plan = self.schedule_prefill(waiting, live, partial, now)
        return Turn(
            step_s,
            prefill=prefill_now,
            latest_start=latest,
            deadline=deadline,
            best_effort=best_effort,
            past_saving=past_saving,
            cost_s=(step_s if live else 0.0) + plan.seconds,
        )
