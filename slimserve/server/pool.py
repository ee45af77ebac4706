"""The variants a server can serve, resident or on disk, within a memory budget.

Variants are loaded in the order given until the server's memory budget is used; the rest stay on
disk and are loaded when a request needs them, evicting the least recently used resident variant that
has nothing running, waiting or reserved (a variant serving a request is never evicted).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slimserve.server.errors import APIError
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import CostProfile
from slimserve.server.serving_engine import EngineState, ServingEngine

log = logging.getLogger(__name__)

AUTO = "auto"
"""Model id that routes within the server's default family (the first variant's)."""

LOADED_OVERHEAD_MB = 150.0
"""Resident memory beyond the weights when a manifest has no measured RSS (runtime buffers, tokenizer)."""

RETRY_LOAD_S = 30.0
"""A variant that failed to load is loaded again by the first request that names it this long after the
failure (or at once by `POST /v1/slimserve/variants/{name}/load`); before then its requests get 503 with
the reason, so a variant that cannot load does not reload on every request."""


@dataclass
class PoolEntry:
    """One variant: its (possibly stopped) engine, live latency profile, and what the router reads."""

    engine: ServingEngine
    profile: CostProfile
    last_used: float = 0.0
    reserved: int = 0
    """Requests routed here that have not been submitted to the engine yet."""
    teacher_ppl: float | None = None
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: bool = False
    on_demand: bool = False
    """Loaded because a request asked for it (requests wait for it) rather than at start-up (503 until ready)."""
    retry_at: float | None = None
    """`time.monotonic()` after which a request may load it again, once it has failed."""

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def manifest(self) -> Any:
        return self.engine.manifest

    @property
    def family(self) -> str:
        return self.manifest.family if self.manifest is not None else self.name

    @property
    def resident(self) -> bool:
        return self.started and self.engine.state is EngineState.READY

    @property
    def available(self) -> bool:
        return self.engine.state is not EngineState.FAILED

    @property
    def memory_mb(self) -> float:
        manifest = self.manifest
        if manifest is None:
            return 600.0
        rss = manifest.metrics.get("rss_mb")
        return float(rss) if rss else manifest.size_bytes / 1e6 + LOADED_OVERHEAD_MB

    @property
    def ppl_ratio(self) -> float | None:
        manifest = self.manifest
        if manifest is None or manifest.name == manifest.base_model:
            return 1.0  # the teacher is the reference
        ppl = manifest.metrics.get("perplexity")
        if ppl is None or not self.teacher_ppl:
            return None
        return float(ppl) / self.teacher_ppl

    @property
    def running(self) -> int:
        return self.engine.running if self.started else 0

    @property
    def waiting(self) -> int:
        return self.engine.waiting if self.started else 0

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def deadlines(self) -> list[tuple[float | None, int]]:
        return self.engine.deadlines() if self.started else []

    def waiting_before(self, deadline: float | None) -> int:
        return self.engine.waiting_before(deadline) if self.started else 0

    @property
    def busy(self) -> bool:
        return self.reserved > 0 or self.running > 0 or self.waiting > 0


class VariantPool:
    """Engines by name and by family, loaded within `memory_budget_mb` (None: no limit)."""

    def __init__(
        self, engines: Sequence[ServingEngine], metrics: ServerMetrics, memory_budget_mb: float | None = None
    ) -> None:
        if not engines:
            raise ValueError("a server needs at least one variant")
        self.metrics = metrics
        self.memory_budget_mb = memory_budget_mb
        self.entries = {e.name: PoolEntry(engine=e, profile=CostProfile.from_manifest(e.manifest)) for e in engines}
        for entry in self.entries.values():
            entry.engine.profile = entry.profile
        self.default = engines[0].name
        self._refresh_teacher_ppl()

    # ---- lookups ---------------------------------------------------------------------------------

    def families(self) -> dict[str, list[PoolEntry]]:
        found: dict[str, list[PoolEntry]] = {}
        for entry in self.entries.values():
            found.setdefault(entry.family, []).append(entry)
        return found

    def targets(self, model: str) -> tuple[list[PoolEntry], bool]:
        """Entries a model id may be served by, and whether the router chooses among them.

        A family name (or `auto`) routes; the teacher's name is also its family's name, so a request that
        names it with no budget gets the best-quality variant, which is the teacher itself.
        """
        families = self.families()
        if model == AUTO:
            return families[self.entries[self.default].family], True
        if model in families and len(families[model]) > 1:
            return families[model], True
        entry = self.entries.get(model)
        if entry is None:
            names = sorted({*self.entries, *(f for f, members in families.items() if len(members) > 1), AUTO})
            raise APIError(
                404,
                f"The model '{model}' does not exist. Available models: {', '.join(names)}",
                param="model",
                code="model_not_found",
            )
        return [entry], False

    def resident_mb(self) -> float:
        return sum(e.memory_mb for e in self.entries.values() if e.started)

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load variants in the order given while they fit the memory budget (the first always)."""
        used = 0.0
        for index, entry in enumerate(self.entries.values()):
            fits = self.memory_budget_mb is None or used + entry.memory_mb <= self.memory_budget_mb
            if index == 0 or fits:
                self._start(entry)
                used += entry.memory_mb
        self._update_memory_metrics()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every started engine, waiting up to `timeout_s` for each (its step under way, or its load)."""
        for entry in self.entries.values():
            if entry.started:
                entry.engine.shutdown(timeout_s)

    def _start(self, entry: PoolEntry) -> None:
        entry.engine.start()
        entry.started = True
        self.metrics.loads.labels(entry.name).inc()

    async def reload(self, entry: PoolEntry) -> ServingEngine:
        """Load a variant again now, whatever its state (a failed load, an eviction); ready when it returns."""
        async with entry.loading:
            if entry.engine.state is EngineState.FAILED:
                self._forget(entry)
        engine = await self.acquire(entry)
        self.release(entry)
        return engine

    def _forget(self, entry: PoolEntry) -> None:
        """Replace a failed engine with a fresh, unstarted one: the next acquire loads it."""
        log.info("loading %s again (it failed: %s)", entry.name, entry.engine.error)
        entry.engine.shutdown()
        entry.engine = entry.engine.fresh()
        entry.engine.profile = entry.profile
        entry.started = False
        entry.retry_at = None

    async def acquire(self, entry: PoolEntry) -> ServingEngine:
        """The entry's engine, loaded (evicting idle variants if the memory budget needs it) and ready. A
        variant that failed is loaded again once `RETRY_LOAD_S` have passed; until then this is a 503."""
        entry.reserved += 1
        entry.last_used = time.monotonic()
        try:
            if entry.engine.state is EngineState.FAILED and not entry.loading.locked():
                if entry.retry_at is None:
                    entry.retry_at = time.monotonic() + RETRY_LOAD_S
                elif time.monotonic() >= entry.retry_at:
                    self._forget(entry)
            if not entry.started:
                async with entry.loading:
                    if not entry.started:
                        self._make_room(entry)
                        began = time.perf_counter()
                        entry.on_demand = True
                        self._start(entry)
                        await asyncio.to_thread(entry.engine.wait_ready)
                        entry.profile.observe_load(time.perf_counter() - began)
                        self._update_memory_metrics()
            elif entry.engine.state is EngineState.LOADING and entry.on_demand:
                async with entry.loading:  # another request is loading it: wait for that load
                    pass
            if entry.engine.state is not EngineState.READY:
                failed = entry.engine.state is EngineState.FAILED
                if failed and entry.retry_at is None:
                    entry.retry_at = time.monotonic() + RETRY_LOAD_S
                detail = f": {entry.engine.error}" if entry.engine.error else ""
                wait_s = max(1, math.ceil((entry.retry_at or 0) - time.monotonic())) if failed else 1
                raise APIError(
                    503,
                    f"model '{entry.name}' is {entry.engine.state.value}{detail}",
                    code="model_load_failed" if failed else "model_not_ready",
                    headers={"Retry-After": str(wait_s)},
                )
            self._refresh_teacher_ppl()
            return entry.engine
        except BaseException:
            entry.reserved -= 1
            raise

    def release(self, entry: PoolEntry) -> None:
        """The request routed to `entry` was handed to its engine (or gave up)."""
        entry.reserved = max(0, entry.reserved - 1)

    def _make_room(self, entry: PoolEntry) -> None:
        if self.memory_budget_mb is None:
            return
        needed = self.resident_mb() + entry.memory_mb - self.memory_budget_mb
        idle = sorted(
            (e for e in self.entries.values() if e.started and e is not entry and not e.busy),
            key=lambda e: e.last_used,
        )
        for victim in idle:
            if needed <= 0:
                break
            self._evict(victim)
            needed -= victim.memory_mb
        if needed > 0:
            raise APIError(
                503,
                f"cannot load '{entry.name}' ({entry.memory_mb:.0f} MB) within the server's memory budget of "
                f"{self.memory_budget_mb:.0f} MB: the resident variants are serving requests",
                code="memory_budget",
                headers={"Retry-After": "1"},
            )

    def _evict(self, entry: PoolEntry) -> None:
        log.info("evicting %s (least recently used, idle)", entry.name)
        entry.engine.shutdown()
        entry.engine = entry.engine.fresh()
        entry.engine.profile = entry.profile
        entry.started = False
        self.metrics.evictions.labels(entry.name).inc()
        self._update_memory_metrics()

    def _update_memory_metrics(self) -> None:
        for entry in self.entries.values():
            self.metrics.resident_mb.labels(entry.name).set(entry.memory_mb if entry.started else 0.0)

    def _refresh_teacher_ppl(self) -> None:
        """Each family's reference perplexity: its teacher's measured one, else the base_model's manifest."""
        teacher_ppl: dict[str, float] = {}
        for entry in self.entries.values():
            manifest = entry.manifest
            if manifest is not None and manifest.name == manifest.base_model and manifest.metrics.get("perplexity"):
                teacher_ppl[manifest.family] = float(manifest.metrics["perplexity"])
        for entry in self.entries.values():
            manifest = entry.manifest
            if manifest is None:
                continue
            entry.teacher_ppl = teacher_ppl.get(manifest.family) or _teacher_ppl_from_metrics(manifest.metrics)


def _teacher_ppl_from_metrics(metrics: dict[str, Any]) -> float | None:
    """Fallback when the teacher is not served: the teacher perplexity `slimserve eval` measured beside it."""
    value = metrics.get("teacher_perplexity")
    return float(value) if value else None
