"""One thread for all model compute on the CPU: every resident variant's prefill and decode steps.

Measured here: torch work spread over threads is slower than the same work on one thread (each thread
that calls into torch gets its own OpenMP team, and idle teams keep spinning on the shared cores).
Running `generate` from FastAPI's threadpool cut bf16 decode from ~50 to ~33 tok/s. With several
variants resident, one thread per engine would oversubscribe the two cores the same way, so all
engines take turns on this one thread: each busy engine runs one step (admitting and prefilling new
sequences, then one decode step of its batch) per round. This also makes the router's cost model
hold: a request's step on one variant waits for one step of every other busy variant, no more.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class Steppable(Protocol):
    """An engine as the compute thread drives it."""

    name: str

    def step(self) -> bool:
        """Run one turn (admit, prefill, one decode step); True if it did any work."""
        ...

    def detached(self) -> bool:
        """True once the engine has stopped and wants no more turns."""
        ...


class ComputeThread:
    """Runs attached engines' turns round-robin on one thread; sleeps while none has work."""

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
        """Something changed (a request arrived, an engine stops): run a round now."""
        self._work.set()

    @property
    def engines(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._engines]

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                self._work.clear()  # a wake() from here on makes the wait below return at once
                with self._lock:
                    engines = list(self._engines)
                worked = False
                for engine in engines:
                    try:
                        worked |= engine.step()
                    except Exception:  # an engine's own errors fail its requests; this is a last resort
                        log.exception("compute turn of %s failed", engine.name)
                    if engine.detached():
                        with self._lock:
                            self._engines.remove(engine)
                if not worked:
                    self._work.wait()
