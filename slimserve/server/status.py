"""What the server says about itself: /health, the model cards of /v1/models, and the router's live state."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from slimserve.server.pool import AUTO, PoolEntry, VariantPool
from slimserve.server.protocol import HealthResponse, HealthStatus, ModelCard
from slimserve.server.router import Budget, Router
from slimserve.server.serving_engine import EngineState


def health(pool: VariantPool, draining: bool) -> tuple[HealthResponse, int]:
    """200 while some variant can serve (`degraded` when another failed to load: `errors` says why); 503
    while the variants loaded at start are loading, when none can serve, or while shutting down. A failed
    variant beside working ones must not hold the whole server at 503 with no reason given."""
    entries = pool.entries.values()
    states = {e.name: e.engine.state.value if e.started else "unloaded" for e in entries}
    errors = {e.name: e.engine.error or "failed" for e in entries if e.engine.state is EngineState.FAILED}
    loading = any(e.started and not e.on_demand and e.engine.state is EngineState.LOADING for e in entries)
    serving = any(e.resident or not e.started for e in entries)  # on disk: loaded by the request that needs it
    status: HealthStatus
    if draining:
        status = "shutting_down"
    elif loading:
        status = "loading"
    elif serving:
        status = "degraded" if errors else "ok"
    else:
        status = "unavailable"
    code = 200 if status in ("ok", "degraded") else 503
    return HealthResponse(status=status, models=states, errors=errors or None), code


def card(pool: VariantPool, entry: PoolEntry) -> ModelCard:
    """A variant's card: its state (and why, if it failed to load) and its manifest's summary."""
    engine, manifest = entry.engine, entry.manifest
    summary: dict[str, Any] = {"state": engine.state.value if entry.started else "unloaded"}
    if engine.state is EngineState.FAILED:
        summary["error"] = engine.error or "failed to load"
    if manifest is not None:
        summary |= {k: getattr(manifest, k) for k in ("family", "method", "bits", "parameters", "size_bytes")}
        summary["runtimes"] = manifest.runtimes
        summary["metrics"] = manifest.metrics
        summary["quality_ratio"] = entry.ppl_ratio
    members = pool.families().get(entry.name, [])
    if len(members) > 1:
        summary["routes"] = [m.name for m in members]
    return ModelCard(
        id=entry.name,
        root=str(engine.variant.path) if engine.variant else None,
        parent=manifest.base_model if manifest and manifest.base_model != entry.name else None,
        max_model_len=engine.context_length if engine.state is EngineState.READY else None,
        slimserve=summary,
    )


def _family_card(model_id: str, members: list[PoolEntry]) -> ModelCard:
    return ModelCard(id=model_id, slimserve={"router": True, "routes": [m.name for m in members]})


def cards(pool: VariantPool) -> list[ModelCard]:
    """Every variant, every family with several members, and `auto` when it routes."""
    found = [card(pool, e) for e in pool.entries.values()]
    for family, members in pool.families().items():
        if len(members) > 1 and family not in pool.entries:
            found.append(_family_card(family, members))
    routed = pool.targets(AUTO)[0]
    if len(routed) > 1:
        found.append(_family_card(AUTO, routed))
    return found


def router_state(pool: VariantPool, router: Router, server_budget: Budget) -> dict[str, Any]:
    """Live profiles, residency and the router's last decisions."""
    variants = []
    for entry in pool.entries.values():
        variants.append(
            {
                "name": entry.name,
                "family": entry.family,
                "state": entry.engine.state.value if entry.started else "unloaded",
                "memory_mb": round(entry.memory_mb, 1),
                "quality_ratio": entry.ppl_ratio,
                "running": entry.running,
                "waiting": entry.waiting,
                "profile": {
                    "ttft_ms_128": round(entry.profile.ttft_ms(128), 1),
                    "step_ms_b1": round(entry.profile.step_ms(1), 2),
                    "step_ms_b8": round(entry.profile.step_ms(8), 2),
                    "load_ms": round(entry.profile.load_ms, 0),
                    "observations": entry.profile.observations,
                },
            }
        )
    return {
        "memory_budget_mb": pool.memory_budget_mb,
        "resident_mb": round(pool.resident_mb(), 1),
        "default_budget": {k: v for k, v in asdict(server_budget).items() if v is not None and v != math.inf},
        "calibration": round(router.calibration, 3),
        "variants": variants,
        "decisions": router.recent(),
    }
