"""One thread for all model compute on the CPU: every resident variant's prefill and decode steps.

Measured here: torch work spread over threads is slower than the same work on one thread (each thread
that calls into torch gets its own OpenMP team, and idle teams keep spinning on the shared cores).
Running `generate` from FastAPI's threadpool cut bf16 decode from ~50 to ~33 tok/s. With several
variants resident, one thread per engine would oversubscribe the two cores the same way, so all
engines take turns on this one thread, one step (admitting and prefilling new sequences, then one
decode step of the batch) per turn.

Whose turn it is follows earliest-deadline-first: a sequence with a latency budget must start its next
step by its deadline minus its remaining tokens' steps, so an engine serving a tight request steps
ahead of one whose requests have time to spare (those catch up later, still within their budgets).
A waiting sequence's prefill counts like a running one's steps: without a budget it comes first (the
request starts at once), with one by the latest start its prefill and tokens allow, so a loose request's
prefill does not cut into a tight one's spare time. Sequences without a budget advance at the
round-robin pace (one step per round of busy engines); ones that can no longer make their budget yield
to every engine due sooner (at least one step a second). Round-robin alone made
every busy variant slow every other's requests by a full step, whatever their budgets.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

BACKGROUND_S = 1.0
"""A sequence past saving (it will miss its budget whatever runs) steps at least this often; otherwise only
when no other engine is due sooner, so it stops taking the cores from requests that can still make it."""

SAFETY = 1.25
"""A budgeted sequence's remaining steps are planned at this multiple of its engine's step time: turns
of other engines (prefills, steps already under way) interleave with its own near its due time."""


@dataclass(frozen=True)
class Turn:
    """What an engine has to do, for the choice of which engine steps next."""

    step_s: float
    """Predicted seconds of its next decode step."""
    prefill: bool = False
    """Sequences without a budget wait for admission (or the engine is stopping): step as soon as possible."""
    latest_start: float | None = None
    """`time.perf_counter()` by which its next step must start so that its budgeted sequences still
    finish on time (None: none that can still make it)."""
    best_effort: bool = False
    """It runs sequences without a budget: they advance at the round-robin pace."""
    past_saving: bool = False
    """It runs sequences that will miss their budgets whatever runs: they advance in the background."""


class Steppable(Protocol):
    """An engine as the compute thread drives it."""

    name: str

    def pending(self) -> Turn | None:
        """Its next turn's urgency, or None when it has nothing to do."""
        ...

    def step(self) -> bool:
        """Run one turn (admit, prefill, one decode step); True if it did any work."""
        ...

    def detached(self) -> bool:
        """True once the engine has stopped and wants no more turns."""
        ...


def due(turn: Turn, last_ran: float, busy_engines: int) -> float:
    """The time by which this engine should step next; the compute thread steps the earliest first."""
    if turn.prefill:
        return -math.inf
    candidates = [math.inf]
    if turn.latest_start is not None:
        candidates.append(turn.latest_start)
    if turn.best_effort:  # the round-robin pace: once per round of every busy engine's step
        candidates.append(last_ran + turn.step_s * busy_engines)
    if turn.past_saving:
        candidates.append(last_ran + BACKGROUND_S)
    return min(candidates)


class ComputeThread:
    """Runs attached engines' turns, earliest due first, on one thread; sleeps while none has work."""

    _shared: ComputeThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "slimserve-compute") -> None:
        self.name = name
        self._engines: list[Steppable] = []
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> ComputeThread:
        """The process-wide compute thread (all CPU engines of a server share it)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = ComputeThread()
            return cls._shared

    def attach(self, engine: Steppable) -> None:
        with self._lock:
            self._engines.append(engine)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self.wake()

    def wake(self) -> None:
        """Something changed (a request arrived, an engine stops): choose a turn now."""
        self._work.set()

    @property
    def engines(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._engines]

    def _run(self) -> None:
        last_ran: dict[int, float] = {}
        stalled: set[int] = set()  # engines whose last turn found nothing to do, until the next wake()
        with torch.inference_mode():
            while True:
                if self._work.is_set():
                    stalled.clear()
                self._work.clear()  # a wake() from here on makes the wait below return at once
                with self._lock:
                    engines = [e for e in self._engines if id(e) not in stalled]
                turns = [(e, e.pending()) for e in engines]
                busy = [(e, turn) for e, turn in turns if turn is not None]
                if not busy:
                    self._work.wait()
                    continue
                # earliest due first; among equals, the engine that has waited longest
                _, _, chosen = min(
                    (due(turn, last_ran.get(id(e), 0.0), len(busy)), last_ran.get(id(e), 0.0), i)
                    for i, (e, turn) in enumerate(busy)
                )
                engine = busy[chosen][0]
                try:
                    if not engine.step():  # its urgency was stale: do not let it win every turn for nothing
                        stalled.add(id(engine))
                except Exception:  # an engine's own errors fail its requests; this is a last resort
                    log.exception("compute turn of %s failed", engine.name)
                last_ran[id(engine)] = time.perf_counter()
                if engine.detached():
                    with self._lock:
                        self._engines.remove(engine)
                    last_ran.pop(id(engine), None)
