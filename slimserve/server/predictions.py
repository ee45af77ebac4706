"""Where a new request would finish on each variant, as the scheduler would run it: the router's predictions
(`edf_plan` on cores whose turns slimserve's compute thread orders by deadline, `round_robin_plan` on cores the
OS shares among vLLM engines, `predict_ms` on a device of its own, `alone_ms`, `deadline_harm`), planned with
the scheduler's own test of whether a sequence can still make its deadline (`scheduler.savable`).

Apart from `scheduler.py` because the scheduler decides one engine's next turn from what it holds, while
these look ahead over every engine's queue for a request not yet placed; both read the same cost profiles.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from slimserve.server.profile import CostProfile
from slimserve.server.scheduler import BACKGROUND_S, savable


class Candidate(Protocol):
    """What the router needs to know about one variant (the pool's entries provide it)."""

    profile: CostProfile

    @property
    def name(self) -> str: ...
    @property
    def resident(self) -> bool: ...
    @property
    def available(self) -> bool: ...
    @property
    def memory_mb(self) -> float: ...
    @property
    def ppl_ratio(self) -> float | None: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def max_batch_size(self) -> int: ...
    def deadlines(self) -> list[tuple[float | None, int]]:
        """(`time.perf_counter()` deadline or None without a budget, tokens left) of its running sequences."""
        ...

    def waiting_before(self, deadline: float | None) -> int:
        """Waiting sequences its engine admits before a new one due at `deadline` (None: no budget): all of
        them where admission is first come first served, those due no later where it is by deadline (vLLM)."""
        ...


def predict_ms(candidate: Candidate, prompt_tokens: int, max_tokens: int, deadline: float | None) -> float:
    """End-to-end latency of this request on `candidate` as its own batch runs it (a device share of its
    own): load if not resident, the queue ahead, its prefill, then `max_tokens` steps at the batch size.
    `deadline`: its own, on the deadlines' clock (None: no budget), which decides the queue ahead of it."""
    profile = candidate.profile
    step = profile.step_ms(min(candidate.running + candidate.waiting + 1, candidate.max_batch_size))
    load = 0.0 if candidate.resident else profile.load_ms
    queue = queued_ms(candidate, prompt_tokens, max_tokens, step, deadline)
    return load + queue + profile.ttft_ms(prompt_tokens) + max_tokens * step


def queued_ms(
    candidate: Candidate, prompt_tokens: int, max_tokens: int, step_ms: float, deadline: float | None
) -> float:
    """Waiting before its prefill: sequences its engine admits first (`Candidate.waiting_before` its
    `deadline`) are prefilled first, and beyond the batch size a slot frees only as running sequences finish."""
    ahead = candidate.waiting_before(deadline)
    queue = ahead * candidate.profile.ttft_ms(prompt_tokens)
    overflow = candidate.running + ahead + 1 - candidate.max_batch_size
    if overflow > 0:
        queue += overflow / candidate.max_batch_size * max_tokens * step_ms
    return queue


def alone_ms(candidate: Candidate, prompt_tokens: int, max_tokens: int) -> float:
    """Latency of this request on `candidate` with the cores to itself: its load if not resident, its
    prefill, then its steps at batch size one. Earliest-deadline-first turns and rows stepped apart
    (`Scheduler.schedule_decode`) give a tight request about this while the rest waits.

    A request no variant fits goes to the cheapest variant fast enough alone, not the cheapest outright
    (which is often too slow for it alone), nor the fastest alone: the workhorse, when fast enough, keeps
    a second engine's steps out of its rounds.

    It is the live profile's figure, unscaled by the router's calibration, as in the engine's test of
    whether a row can still be saved: the calibration carries the waiting of requests that run with the
    others, which a row stepped apart ahead of them does not do."""
    profile = candidate.profile
    load = 0.0 if candidate.resident else profile.load_ms
    return load + profile.ttft_ms(prompt_tokens) + max_tokens * profile.step_ms(1)


def deadline_harm(target: Candidate, prompt_tokens: int, now: float | None = None) -> int:
    """On a device share of its own (no shared cores): how many of `target`'s running sequences, predicted to
    meet their deadline now, would miss it if one more request joined its batch (its prefill, then a
    larger batch for each token they still have to generate). `now`: on the deadlines' clock
    (`time.perf_counter()` when not given)."""
    now = time.perf_counter() if now is None else now
    busy = target.running + target.waiting
    step_now = target.profile.step_ms(busy) if busy else 0.0
    added = target.profile.step_ms(busy + 1) - step_now
    prefill = target.profile.ttft_ms(prompt_tokens)
    pushed = 0
    for deadline, remaining in target.deadlines():
        if deadline is None:
            continue
        slack = 1000 * (deadline - now) - remaining * step_now
        if 0 <= slack < prefill + remaining * added:
            pushed += 1
    return pushed


@dataclass(frozen=True)
class Plan:
    """A new request on one candidate, as the shared cores would run it (`edf_plan`, `round_robin_plan`)."""

    finish_ms: float
    """Predicted time until its last token: its load time, its wait for a batch slot, and the cores' work
    until its last step (under `edf_plan` the work due before its deadline; under `round_robin_plan` every
    busy engine's step each round)."""
    harm: int
    """Running sequences predicted to meet their deadlines now that would miss them with it admitted."""


def edf_plan(
    candidates: Sequence[Candidate],
    target: Candidate,
    prompt_tokens: int,
    max_tokens: int,
    deadline_ms: float | None,
    scale: float = 1.0,
    now: float | None = None,
) -> Plan:
    """Place a request with `deadline_ms` (from now; None: no budget) on `target`, under the compute thread's
    earliest-deadline-first turns (`compute`).

    The demand test of EDF scheduling: by each deadline d, the cores must have done every step due by d.
    A sequence due by d needs its engine's remaining steps (a batch step serves all its sequences at
    once, so an engine's work is its longest remaining sequence due by d), at that engine's step time for
    the number of its sequences due by d (urgent rows step apart from the rest of their batch). Sequences
    without a budget are due at the round-robin pace, as the compute thread runs them; ones past saving
    yield to everything else but still step once per `BACKGROUND_S`, which counts as work due by each
    deadline. The new request adds its prefill and makes its engine's batch one larger. `scale`: real time
    per profile time (the router's calibration); deadlines are compared with the profiles' work in profile
    time. `now`: on the deadlines' clock (`time.perf_counter()` when not given).
    """
    now = time.perf_counter() if now is None else now
    busy = {c.name: c.running + c.waiting for c in candidates}
    steps_before = {c.name: c.profile.step_ms(busy[c.name]) for c in candidates if busy[c.name]}
    steps_after = dict(steps_before, **{target.name: target.profile.step_ms(busy[target.name] + 1)})
    pace = sum(steps_after.values())  # one round of every busy engine
    due: list[float] = []  # ms from now
    engine: list[str] = []
    steps_left: list[int] = []
    budgeted: list[bool] = []
    for c in candidates:
        for deadline, remaining in c.deadlines():
            if deadline is None:  # no budget: the compute thread runs it at the round-robin pace
                due.append(remaining * pace)
            elif savable(1000 * (deadline - now) / scale, remaining, c.profile.step_ms(1)):
                due.append(1000 * (deadline - now) / scale)
            else:  # past saving (not even its own steps, stepped apart, fit): it yields to everything else
                due.append(math.inf)
            engine.append(c.name)
            steps_left.append(remaining)
            budgeted.append(deadline is not None and due[-1] != math.inf)
    prefill = target.profile.ttft_ms(prompt_tokens)

    background: dict[str, int] = {}  # per engine: the most steps left of its sequences past saving
    for name, left, when in zip(engine, steps_left, due, strict=True):
        if when == math.inf:
            background[name] = max(background.get(name, 0), left)

    profiles = {c.name: c.profile for c in candidates}

    def demand(jobs: list[int], steps: dict[str, float], first_ms: float) -> dict[int, float]:
        """Per job: the work (ms) that must be done by its due time. An engine steps its rows due first apart
        from the rest of its batch when they need it (`Scheduler.schedule_decode`), so the work due by a
        deadline runs at the step time of that engine's rows due by then, not of its whole batch; once a row
        due by then cannot finish in time even alone, it is not stepped apart, and neither is the rest."""
        longest: dict[str, int] = {}
        apart: dict[str, int] = {}  # per engine: rows due so far, or 0 once they step as the whole batch
        work = {}
        for job in sorted(jobs, key=lambda j: due[j]):
            if due[job] == math.inf:
                continue
            name = engine[job]
            longest[name] = max(longest.get(name, 0), steps_left[job])
            can_save = savable(due[job], steps_left[job], profiles[name].step_ms(1))
            apart[name] = apart.get(name, 0) + 1 if can_save and apart.get(name, -1) != 0 else 0
            pending = sum(
                (min(steps.get(n, 0.0), profiles[n].step_ms(apart[n])) if apart[n] else steps.get(n, 0.0)) * left
                for n, left in longest.items()
            )
            behind = sum(
                steps.get(name, 0.0) * min(left, due[job] / (1000 * BACKGROUND_S))
                for name, left in background.items()
                if name not in longest
            )
            work[job] = first_ms + pending + behind
        return work

    running = list(range(len(due)))
    before = demand(running, steps_before, 0.0)
    due.append(deadline_ms / scale if deadline_ms is not None else prefill + max_tokens * pace)
    engine.append(target.name)
    steps_left.append(max_tokens)
    budgeted.append(False)
    after = demand([*running, len(due) - 1], steps_after, prefill)
    harm = sum(1 for j in running if budgeted[j] and before[j] <= due[j] < after[j])
    load = 0.0 if target.resident else target.profile.load_ms
    its_deadline = None if deadline_ms is None else now + deadline_ms / 1000
    queue = queued_ms(target, prompt_tokens, max_tokens, steps_after[target.name], its_deadline)
    finish = load + queue + after[len(due) - 1]
    return Plan(finish * scale, harm)


def round_robin_plan(
    candidates: Sequence[Candidate],
    target: Candidate,
    prompt_tokens: int,
    max_tokens: int,
    deadline_ms: float | None,
    scale: float = 1.0,
    now: float | None = None,
) -> Plan:
    """Place a request on `target` when engines share the cores by turns no deadline orders: vLLM engines,
    each in its own process, which the OS runs in turn (`sim_vllm`). Every busy engine steps its whole batch
    once a round, so a row's next token waits for one step of every busy engine: waking an idle engine
    slows every running row by that engine's step, while joining a busy batch adds only what one more row
    costs its step. The request's prefill is one step of the host; it then needs `max_tokens - 1` rounds.

    Run forward exactly, from one row's last token to the next (between them every round costs the same):
    the rows' finishing times with and without the request give its latency and the budgets it breaks.
    Waiting sequences whose length is unknown count as `max_tokens` long; an engine's step costs at most its
    `max_batch_size` rows (those beyond wait: `queued_ms`). `deadline_ms` orders only the engine's admission
    (`queued_ms`), not the OS's turns. `scale` and `now` as in `edf_plan`.
    """
    now = time.perf_counter() if now is None else now
    rows: dict[str, list[tuple[float | None, int]]] = {}
    for c in candidates:
        known = [(None if d is None else 1000 * (d - now) / scale, left) for d, left in c.deadlines()]
        unknown = max(0, c.running + c.waiting - len(known))
        if known or unknown:
            rows[c.name] = known + [(None, max_tokens)] * unknown
    profiles = {c.name: c.profile for c in candidates}
    limits = {c.name: c.max_batch_size for c in candidates}

    def step_ms(name: str, rows_now: int) -> float:
        return profiles[name].step_ms(min(rows_now, limits[name]))

    def finishes(first_ms: float, extra: str | None) -> dict[tuple[str, int], float]:
        """Each row's last token (ms from now); `extra` names the engine whose last row is the new request."""
        left = {(name, i): steps for name, batch in rows.items() for i, (_, steps) in enumerate(batch)}
        if extra is not None:
            left[(extra, len(rows.get(extra, [])))] = max(max_tokens - 1, 0)
        done = {key: first_ms for key, steps in left.items() if steps <= 0}
        left = {key: steps for key, steps in left.items() if steps > 0}
        clock = first_ms
        while left:
            batches: dict[str, int] = {}
            for name, _ in left:
                batches[name] = batches.get(name, 0) + 1
            round_ms = sum(step_ms(name, n) for name, n in batches.items())
            rounds = min(left.values())
            clock += rounds * round_ms
            for key in list(left):
                left[key] -= rounds
                if left[key] == 0:
                    done[key] = clock
                    del left[key]
        return done

    before = finishes(0.0, None)
    after = finishes(target.profile.ttft_ms(prompt_tokens), target.name)
    harm = 0
    for name, batch in rows.items():
        for i, (due, _) in enumerate(batch):
            if due is not None and before[(name, i)] <= due < after[(name, i)]:
                harm += 1
    load = 0.0 if target.resident else target.profile.load_ms
    joined = dict.fromkeys(rows, 0) | {target.name: 1}
    round_ms = sum(step_ms(name, len(rows.get(name, [])) + extra) for name, extra in joined.items())
    # a slot frees a round of every engine at a time; vLLM admits waiting requests by deadline
    its_deadline = None if deadline_ms is None else now + deadline_ms / 1000
    queue = queued_ms(target, prompt_tokens, max_tokens, round_ms, its_deadline)
    finish = load + queue + after[(target.name, len(rows.get(target.name, [])))]
    return Plan(finish * scale, harm)
