"""Budget-aware routing: per request, the best variant of a family predicted to fit the caller's budget.

A budget is a latency (end to end, milliseconds), a memory ceiling (the variant's resident size) and a
minimum quality (the variant's held-out perplexity as a ratio to the teacher's, or a named tier). The
router predicts each candidate's latency for *this* request from a live profile (time to first token as
a function of prompt length, time per decode step as a function of batch size, the queue ahead, the load
time when the variant is not resident), starting from the figures `slimserve eval` wrote into the
manifest and corrected by what the engine measures while serving. It picks the highest-quality variant
predicted to meet the budget; if none can, the fastest, and says so.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from slimserve.models.manifest import VariantManifest

QUALITY_TIERS = {"teacher": 1.005, "high": 1.02, "medium": 1.10, "low": 1.50, "any": math.inf}
"""Named minimum qualities: the largest perplexity ratio to the teacher each tier accepts."""

HEADER_LATENCY = "x-latency-budget-ms"
HEADER_MEMORY = "x-memory-budget-mb"
HEADER_QUALITY = "x-min-quality"


class BudgetError(ValueError):
    """A budget the server cannot interpret (answered with 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    memory_mb: float | None = None
    max_ppl_ratio: float = math.inf
    """The minimum quality, as the largest perplexity ratio to the teacher that is acceptable."""


def _positive(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"{name} must be a positive number, got {value!r}", name) from None
    if not math.isfinite(number) or number <= 0:
        raise BudgetError(f"{name} must be a positive number, got {value!r}", name)
    return number


def parse_quality(value: Any, name: str = HEADER_QUALITY) -> float:
    """A tier name or a perplexity ratio >= 1 (1.05 = at most 5% worse than the teacher)."""
    if isinstance(value, str) and value.strip().lower() in QUALITY_TIERS:
        return QUALITY_TIERS[value.strip().lower()]
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        tiers = ", ".join(QUALITY_TIERS)
        raise BudgetError(
            f"{name} must be a perplexity ratio to the teacher (>= 1, e.g. 1.05) or a tier ({tiers}); got {value!r}",
            name,
        ) from None
    if not math.isfinite(ratio) or ratio < 1.0:
        raise BudgetError(f"{name} is a perplexity ratio to the teacher and must be >= 1, got {value!r}", name)
    return ratio


def parse_budget(headers: dict[str, str], body: dict[str, Any] | None, default: Budget) -> Budget:
    """Headers win over the body's `slimserve` object; what neither gives comes from the server default."""
    body = body or {}
    unknown = sorted(set(body) - {"latency_budget_ms", "memory_budget_mb", "min_quality"})
    if unknown:
        raise BudgetError(
            f"unknown slimserve field(s) {', '.join(unknown)}; use latency_budget_ms, memory_budget_mb, min_quality",
            "slimserve",
        )
    latency = headers.get(HEADER_LATENCY, body.get("latency_budget_ms"))
    memory = headers.get(HEADER_MEMORY, body.get("memory_budget_mb"))
    quality = headers.get(HEADER_QUALITY, body.get("min_quality"))
    return Budget(
        latency_ms=_positive(latency, HEADER_LATENCY) if latency is not None else default.latency_ms,
        memory_mb=_positive(memory, HEADER_MEMORY) if memory is not None else default.memory_mb,
        max_ppl_ratio=parse_quality(quality) if quality is not None else default.max_ppl_ratio,
    )


def _nlms(
    scale: float, tilt: float, f_scale: float, f_tilt: float, observed: float, rate: float
) -> tuple[float, float]:
    """One normalised-LMS step of y = scale * f_scale + tilt * f_tilt towards `observed` (stable for rate < 2)."""
    error = observed - (scale * f_scale + tilt * f_tilt)
    gain = rate / max(f_scale * f_scale + f_tilt * f_tilt, 1e-9)
    return scale + gain * f_scale * error, tilt + gain * f_tilt * error


@dataclass
class LatencyProfile:
    """Predicted time to first token and per decode step of one variant, corrected from live traffic.

    The manifest's lines (TTFT(L) = overhead + per_token * L; step(B) = interpolation between its batch-1
    and batch-8 step times) are the shape; traffic learns a scale (the machine is uniformly slower or
    faster than when the manifest was measured) and a tilt (one end is off, e.g. per-sequence overhead
    makes large batches slower than the batch-8 figure). Each observation moves the prediction
    `smoothing` of the way to it.
    """

    prefill_overhead_ms: float
    prefill_per_token_ms: float
    step_b1_ms: float
    step_b8_ms: float
    load_ms: float
    smoothing: float = 0.2
    observations: int = 0
    step_scale: float = 1.0
    step_tilt: float = 0.0
    prefill_scale: float = 1.0
    prefill_tilt: float = 0.0

    @classmethod
    def from_manifest(cls, manifest: VariantManifest | None) -> LatencyProfile:
        """Start from the manifest's measured figures (or conservative guesses from the size)."""
        metrics = manifest.metrics if manifest else {}
        size_mb = (manifest.size_bytes / 1e6) if manifest else 500.0
        b1 = float(metrics.get("decode_tok_s_b1") or max(5.0, 12000.0 / max(size_mb, 1.0)))
        b8 = float(metrics.get("decode_tok_s_b8") or 4 * b1)
        ttft_128 = float(metrics.get("ttft_ms_128") or 1000.0 * 128 / (20 * b1))
        return cls(
            prefill_overhead_ms=0.2 * ttft_128,
            prefill_per_token_ms=0.8 * ttft_128 / 128,
            step_b1_ms=1000.0 / b1,
            step_b8_ms=8000.0 / b8,
            load_ms=1000.0 * float(metrics.get("load_s") or size_mb / 100.0),
        )

    def _prefill_features(self, prompt_tokens: int) -> tuple[float, float]:
        at_128 = self.prefill_overhead_ms + 128 * self.prefill_per_token_ms
        # the tilt pivots at 128 tokens, so scale (the level) and tilt (the slope) are learned apart
        return self.prefill_overhead_ms + self.prefill_per_token_ms * prompt_tokens, (prompt_tokens / 128 - 1) * at_128

    def _step_features(self, batch: int) -> tuple[float, float]:
        share = (max(1, batch) - 1) / 7  # 0 at batch 1, 1 at batch 8 (beyond: extrapolated)
        # the tilt is zero at batch 1: an error seen at batch 1 rescales the whole line
        return self.step_b1_ms + share * (self.step_b8_ms - self.step_b1_ms), share * self.step_b1_ms

    def ttft_ms(self, prompt_tokens: int) -> float:
        f_scale, f_tilt = self._prefill_features(prompt_tokens)
        return max(self.prefill_scale * f_scale + self.prefill_tilt * f_tilt, 0.1)

    def step_ms(self, batch: int) -> float:
        f_scale, f_tilt = self._step_features(batch)
        return max(self.step_scale * f_scale + self.step_tilt * f_tilt, 0.1)

    def observe_prefill(self, prompt_tokens: int, seconds: float) -> None:
        f_scale, f_tilt = self._prefill_features(prompt_tokens)
        self.prefill_scale, self.prefill_tilt = _nlms(
            self.prefill_scale, self.prefill_tilt, f_scale, f_tilt, 1000 * seconds, self.smoothing
        )
        self.observations += 1

    def observe_step(self, batch: int, seconds: float) -> None:
        f_scale, f_tilt = self._step_features(batch)
        self.step_scale, self.step_tilt = _nlms(
            self.step_scale, self.step_tilt, f_scale, f_tilt, 1000 * seconds, self.smoothing
        )
        self.observations += 1

    def observe_load(self, seconds: float) -> None:
        self.load_ms = 1000 * seconds


class Candidate(Protocol):
    """What the router needs to know about one variant (the pool's entries provide it)."""

    profile: LatencyProfile

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
    def deadlines(self) -> list[tuple[float, int]]:
        """(`time.perf_counter()` deadline, tokens left) of its running sequences that have a budget."""
        ...


C = TypeVar("C", bound=Candidate)


def predict_ms(candidate: Candidate, prompt_tokens: int, max_tokens: int, elsewhere_ms: float = 0.0) -> float:
    """End-to-end latency of this request on `candidate`, given what is running and waiting there now.

    `elsewhere_ms`: the decode-step time of the other busy variants sharing this machine's cores; engines
    take turns on the CPU, so each of this request's steps also waits for one step of each of them.
    """
    profile = candidate.profile
    ahead = candidate.waiting
    batch = min(candidate.running + ahead + 1, candidate.max_batch_size)
    load = 0.0 if candidate.resident else profile.load_ms
    step = profile.step_ms(batch) + elsewhere_ms
    # sequences waiting ahead are prefilled first; beyond the batch size, a slot frees only as others finish
    queue = ahead * profile.ttft_ms(prompt_tokens)
    overflow = candidate.running + ahead + 1 - candidate.max_batch_size
    if overflow > 0:
        queue += overflow / candidate.max_batch_size * max_tokens * step
    return load + queue + profile.ttft_ms(prompt_tokens) + elsewhere_ms + max_tokens * step


def step_ms_elsewhere(candidates: Sequence[Candidate], shared: bool) -> dict[str, float]:
    """Per candidate: the summed decode-step time of the *other* busy candidates (0 when not `shared`)."""
    if not shared:
        return {c.name: 0.0 for c in candidates}
    busy = {c.name: c.profile.step_ms(c.running + c.waiting) for c in candidates if c.running + c.waiting > 0}
    total = sum(busy.values())
    return {c.name: total - busy.get(c.name, 0.0) for c in candidates}


def deadline_harm(candidates: Sequence[Candidate], target: Candidate, prompt_tokens: int, shared: bool) -> int:
    """How many running sequences, predicted to meet their deadline now, would miss it if one more request
    joined `target`: its prefill, then a larger batch there (or, on shared cores, one more variant's step
    in every round) for each token they still have to generate."""
    now = time.perf_counter()
    busy = {c.name: c.running + c.waiting for c in candidates}
    step_now = {c.name: c.profile.step_ms(busy[c.name]) if busy[c.name] else 0.0 for c in candidates}
    after = target.profile.step_ms(busy[target.name] + 1)
    added = after - step_now[target.name]
    prefill = target.profile.ttft_ms(prompt_tokens)
    round_ms = sum(step_now.values())
    pushed = 0
    for c in candidates:
        if not shared and c is not target:
            continue  # on its own device share, a variant's sequences are slowed only by its own batch
        per_token = round_ms if shared else step_now[c.name]
        for deadline, remaining in c.deadlines():
            slack = 1000 * (deadline - now) - remaining * per_token
            if 0 <= slack < prefill + remaining * added:
                pushed += 1
    return pushed


@dataclass
class Decision:
    variant: str
    predicted_ms: float
    budget_met: bool | None
    """None when the request set no latency budget."""
    reason: str
    candidates: dict[str, float] = field(default_factory=dict)
    """Predicted milliseconds per considered variant."""
    at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    max_tokens: int = 0
    budget: dict[str, Any] = field(default_factory=dict)


class Router:
    """Chooses a variant per request; keeps the last decisions for inspection."""

    def __init__(
        self,
        history: int = 100,
        shared_compute: bool = True,
        headroom: float = 0.1,
        quality_tolerance: float = 0.005,
    ) -> None:
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.shared_compute = shared_compute
        """Variants share the same cores (the CPU backend): a busy variant slows the others' steps."""
        self.headroom = headroom
        """Share of the latency budget kept free when choosing: requests that arrive later join the batch
        and slow this one down, which no prediction made now can see."""
        self.quality_tolerance = quality_tolerance
        """Perplexity ratios this close (relative) count as equal quality; among equals the fastest wins,
        which leaves the cores to requests that need them (an int8 variant at +0.0% serves instead of the
        teacher)."""
        self._lock = threading.Lock()

    def choose(
        self, candidates: Sequence[C], budget: Budget, prompt_tokens: int, max_tokens: int
    ) -> tuple[list[C], Decision]:
        """Candidates in the order to try (best first; the rest are fallbacks if the first is full)."""
        usable = [c for c in candidates if c.available]
        if not usable:
            raise BudgetError("no variant of this family can serve requests right now", "model")
        if budget.memory_mb is not None:
            fitting = [c for c in usable if c.memory_mb <= budget.memory_mb]
            if not fitting:
                smallest = min(usable, key=lambda c: c.memory_mb)
                raise BudgetError(
                    f"memory budget {budget.memory_mb:g} MB is smaller than every variant "
                    f"(smallest: {smallest.name}, {smallest.memory_mb:.0f} MB)",
                    HEADER_MEMORY,
                )
            usable = fitting
        elsewhere = step_ms_elsewhere(candidates, self.shared_compute)
        predicted = {c.name: predict_ms(c, prompt_tokens, max_tokens, elsewhere[c.name]) for c in usable}

        harm = {c.name: deadline_harm(usable, c, prompt_tokens, self.shared_compute) for c in usable}
        met: bool | None

        def quality(c: Candidate) -> float:
            return c.ppl_ratio if c.ppl_ratio is not None else math.inf

        def best_first(group: list[C], tolerance: float) -> list[C]:
            """By quality, then by predicted latency among variants of equal quality (within `tolerance`)."""
            if not group:
                return []
            top = min(quality(c) for c in group)
            equal = [c for c in group if quality(c) <= top * (1 + tolerance)]
            rest = [c for c in group if c not in equal]
            return sorted(equal, key=lambda c: predicted[c.name]) + best_first(rest, tolerance)

        good_enough = [c for c in usable if quality(c) <= budget.max_ppl_ratio]
        if not good_enough:
            order = best_first(usable, self.quality_tolerance)
            reason = f"no variant reaches quality ratio {budget.max_ppl_ratio:g}: best available"
            met = False
        elif budget.latency_ms is None:
            # no budget: the best quality itself (naming the teacher's family gets the teacher), unless that
            # would push running requests over their budgets
            least = min(harm[c.name] for c in good_enough)
            safe = [c for c in good_enough if harm[c.name] == least]
            order = best_first(safe, 0.0) + best_first([c for c in good_enough if c not in safe], 0.0)
            reason = "no latency budget: best quality"
            met = None
        else:
            limit = budget.latency_ms * (1 - self.headroom)

            def score(c: C) -> tuple[int, int]:
                """Requests kept within budget (this one, minus running ones it would push over), then
                fewer pushed over: earlier requests' budgets are not traded for this one's."""
                return (int(predicted[c.name] <= limit) - harm[c.name], -harm[c.name])

            top = max(score(c) for c in good_enough)
            best = [c for c in good_enough if score(c) == top]
            fits = [c for c in best if predicted[c.name] <= limit]
            if fits:
                order = best_first(fits, self.quality_tolerance)
                reason = "best quality predicted within the latency budget"
                met = True
            else:
                order = sorted(best, key=lambda c: predicted[c.name])
                met = predicted[order[0].name] <= budget.latency_ms
                reason = (
                    "fastest: predicted within the budget but not its headroom"
                    if met
                    else "no variant predicted within the latency budget: fastest"
                )
            order += sorted((c for c in good_enough if c not in order), key=lambda c: (-score(c)[0], predicted[c.name]))
        if harm[order[0].name]:
            reason += f"; pushes {harm[order[0].name]} running request(s) over their budget"
        chosen = order[0]
        decision = Decision(
            variant=chosen.name,
            predicted_ms=round(predicted[chosen.name], 1),
            budget_met=met,
            reason=reason,
            candidates={name: round(ms, 1) for name, ms in predicted.items()},
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            budget={k: v for k, v in asdict(budget).items() if v is not None and v != math.inf},
        )
        with self._lock:
            self.decisions.append(decision)
        return order, decision

    def recent(self, count: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(d) for d in list(self.decisions)[-count:]]
