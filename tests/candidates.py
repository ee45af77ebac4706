"""Variants as the router sees them, figures only: the candidates of routing and prediction tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimserve.server.profile import CostProfile


@dataclass
class Described:
    """A variant as the router sees it (the `predictions.Candidate` protocol), with made-up figures."""

    name: str
    profile: CostProfile
    ppl_ratio: float | None
    memory_mb: float
    resident: bool = True
    available: bool = True
    running: int = 0
    waiting: int = 0
    max_batch_size: int = 8
    pending: list[tuple[float | None, int]] = field(default_factory=list)
    """Running sequences' (deadline, tokens left); any others of `running` have no budget, 50 tokens left."""

    def deadlines(self) -> list[tuple[float | None, int]]:
        return [*self.pending, *[(None, 50)] * (self.running - len(self.pending))]

    def waiting_before(self, deadline: float | None) -> int:
        return self.waiting  # first come first served


def variant(name: str, step_ms: float, ppl_ratio: float, memory_mb: float, **kw: object) -> Described:
    """Prefill 5 ms + 0.5 ms a prompt token; a decode step `step_ms` at one row, twice that at eight."""
    profile = CostProfile(
        prefill_overhead_ms=5, prefill_per_token_ms=0.5, step_b1_ms=step_ms, step_b8_ms=2 * step_ms, load_ms=3000
    )
    return Described(name, profile, ppl_ratio, memory_mb, **kw)  # type: ignore[arg-type]
