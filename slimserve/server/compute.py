"""One thread for all model compute on the CPU: every resident variant's prefill and decode steps.

Torch work spread over threads is slower than the same work on one thread: each thread that calls into
torch gets its own OpenMP team, and idle teams keep spinning on the shared cores. So all engines take
turns on this one thread, one step (admitting and prefilling new sequences, then one decode step of the
batch) per turn.

Whose turn it is follows earliest-deadline-first: among engines serving sequences with a latency budget,
the one whose earliest deadline comes first steps, so a tight request's steps run back to back ahead of
one with time to spare. This is the order the router's `edf_plan` predicts finish times under (least
laxity first would run a long request ahead of a short one due sooner until both were at the edge of their
budgets). A waiting sequence's prefill counts like a running one's steps: without a budget it comes first
(the request starts at once), with one by its deadline. Sequences without a budget advance at the
round-robin pace (one step per round of busy engines), and ones that can no longer make their budget at
least once a second; either steps ahead of budgeted work only while that work's latest start leaves time
(round-robin alone would slow every variant's requests by a full step of each other busy variant). The
choice itself is the scheduler's (`scheduler.next_turn`); this module runs it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch

from slimserve.server.scheduler import Turn, next_turn

log = logging.getLogger(__name__)


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

    def last_turn(self) -> dict[str, Any]:
        """What its last `step` did (sequences prefilled, rows stepped), for the turn trace."""
        ...


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
        self._trace: TextIO | None = None

    def trace_turns(self, path: Path | None) -> None:
        """Append one JSON line per turn to `path` (None: stop): when it began (`time.perf_counter()`, the
        same clock as a client's on this machine), how long it took, whose turn it was, what it did. What a
        request's latency was spent on under load is otherwise not observable from outside."""
        with self._lock:
            if self._trace is not None:
                self._trace.close()
            self._trace = path.open("a", buffering=1) if path is not None else None

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
                chosen = next_turn(
                    [turn for _, turn in busy], [last_ran.get(id(e), 0.0) for e, _ in busy], time.perf_counter()
                )
                engine = busy[chosen][0]
                began = time.perf_counter()
                worked = False
                try:
                    worked = engine.step()
                    if not worked:  # its urgency was stale: do not let it win every turn for nothing
                        stalled.add(id(engine))
                except Exception:  # an engine's own errors fail its requests; this is a last resort
                    log.exception("compute turn of %s failed", engine.name)
                last_ran[id(engine)] = time.perf_counter()
                if self._trace is not None and worked:
                    self._write_trace(engine, began, last_ran[id(engine)] - began)
                if engine.detached():
                    with self._lock:
                        self._engines.remove(engine)
                    last_ran.pop(id(engine), None)

    def _write_trace(self, engine: Steppable, began: float, seconds: float) -> None:
        line = json.dumps({"at": round(began, 4), "s": round(seconds, 4), "engine": engine.name, **engine.last_turn()})
        with self._lock:
            if self._trace is not None:
                self._trace.write(line + "\n")
