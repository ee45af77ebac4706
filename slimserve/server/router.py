"""Budget-aware routing: per request, the best variant of a family predicted to fit the caller's budget.

A budget is a latency (end to end, milliseconds), a memory ceiling (the variant's resident size) and a
minimum quality (the variant's held-out perplexity as a ratio to the teacher's, or a named tier). The
router predicts each candidate's latency for *this* request from a live profile (time to first token as a
function of prompt length, time per decode step as a function of batch size, the queue ahead, the load time
when the variant is not resident), starting from the figures `slimserve profile` (or `slimserve eval`) wrote
into the manifest and corrected by what the engine measures while serving. On the CPU, where every variant's
steps share the cores, the prediction follows the compute thread's earliest-deadline-first turns (the scheduler's
`edf_plan`, which plans as its `Scheduler` runs them): a request is placed where it meets its budget
without pushing running requests over theirs. It picks the highest-quality variant predicted to meet the
budget; if none can, the fastest, and says so. Among variants of equal quality, and for a request no
variant can serve in time, "fastest" on shared cores means the workhorse (`workhorse_ms`): the variant
whose steps cost this request least at the batch it would join, by its measured figures, so load gathers
on one engine's batch instead of spreading; a request that only steps of its own can still save goes to
the workhorse of the variants whose steps alone make it (`alone_ms`). While the calibration says the cores
are busier than the profiles know (`BUSY_CALIBRATION`), a request the best variant would miss moves only to
variants no dearer per row at capacity (`row_at_capacity_ms`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from slimserve.server.predictions import (
    Candidate,
    alone_ms,
    deadline_harm,
    edf_plan,
    predict_ms,
    round_robin_plan,
)
from slimserve.server.profile import Sharing

QUALITY_TIERS = {"teacher": 1.005, "high": 1.02, "medium": 1.10, "low": 1.50, "any": math.inf}
"""Named minimum qualities: the largest perplexity ratio to the teacher each tier accepts."""

BUSY_CALIBRATION = 1.1
"""The calibration above which the cores count as short (the capacity rule, `Router._no_dearer_at_capacity`):
below it, the excess is within what one request's prediction misses by once the host's speed is known (the
error at host speed, docs/BENCHMARKS.md, Simulator fidelity), or a slow phase of the host that the live
profiles have already learned, when the idle variants faster alone are the ones that can still meet budgets."""

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


C = TypeVar("C", bound=Candidate)


def workhorse_ms(target: Candidate, prompt_tokens: int, max_tokens: int) -> float:
    """Cost of this request to the cores on `target` when the router sheds load: its prefill, then its
    share of `max_tokens` steps of the batch it would join (one step at the batch's size divided by its
    rows), by the manifest's figures (plus the load if not resident).

    The batch it joins, not batch one: a variant whose step barely grows with its rows (the bf16 teacher on
    AMX: 40 ms at one row, 49 at sixteen) costs the cores far less per request once busy than one faster
    alone that batches poorly (int4 there: 21 and 59 ms); docs/BENCHMARKS.md, Routing on the simulator, rule
    `workhorse`. An idle variant is ranked at batch one.

    The figures are the manifest's, measured on a quiet machine, not the ones corrected from traffic: those
    carry the contention of whenever each variant ran, so the variant that serves under load would learn
    to look slow and lose the load it serves best.
    """
    profile = target.profile
    load = 0.0 if target.resident else profile.load_ms
    rows = min(target.running + target.waiting + 1, target.max_batch_size)
    per_row_ms = profile.manifest_step_ms(rows) / rows
    return load + profile.manifest_ttft_ms(prompt_tokens) + max_tokens * per_row_ms


def ppl_ratio(candidate: Candidate) -> float:
    """Its quality for ranking: the perplexity ratio to the teacher, unknown ranked last."""
    return candidate.ppl_ratio if candidate.ppl_ratio is not None else math.inf


def row_at_capacity_ms(target: Candidate) -> float:
    """What one row's token costs the cores on `target` with its batch full (its step at `max_batch_size`
    rows divided by them), by the manifest's figures: the cost that decides how much a family serves once
    the cores are short, whichever engine happens to be busy now."""
    rows = target.max_batch_size
    return target.profile.manifest_step_ms(rows) / rows


@dataclass
class Decision:
    variant: str
    predicted_ms: float
    budget_met: bool | None
    """None when the request set no latency budget; False when predicted to miss, even by the calibration
    alone (`teaches`)."""
    reason: str
    candidates: dict[str, float] = field(default_factory=dict)
    """Predicted milliseconds per considered variant."""
    at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    max_tokens: int = 0
    budget: dict[str, Any] = field(default_factory=dict)
    first_token_ms: dict[str, float] = field(default_factory=dict)
    """Per considered variant: the part of its prediction before the decode steps (load, queue, prefill)."""
    scale: float = 1.0
    """The calibration its predictions were scaled by, which `Router.observe` takes back out."""
    teaches: bool = True
    """Whether its outcome calibrates the router (`Router.observe`): not when predicted to miss, unless the
    capacity rule (`Router._no_dearer_at_capacity`) kept it off variants predicted to fit (then `budget_met`
    is False, and its outcome is what brings the calibration back down once the cores are no longer short)."""

    def expected_ms(self, tokens: int) -> float:
        """The prediction for a request that generated `tokens` (of `max_tokens`): the part before the decode
        steps in full, and the steps' share in proportion, so a request that stopped early is compared with
        what its own length should have taken."""
        if self.max_tokens <= 0 or tokens >= self.max_tokens:
            return self.predicted_ms
        first = min(self.first_token_ms.get(self.variant, 0.0), self.predicted_ms)
        return first + (self.predicted_ms - first) * max(tokens, 0) / self.max_tokens


class Router:
    """Chooses a variant per request; keeps the last decisions for inspection."""

    def __init__(
        self,
        history: int = 100,
        sharing: Sharing = "deadline",
        quality_tolerance: float = 0.005,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.decisions: deque[Decision] = deque(maxlen=history)
        self.sharing = sharing
        """How the variants' steps share the hardware (`profile.Sharing`): on shared cores a busy variant
        slows the others' steps, in the compute thread's deadline order or in the OS's turns."""
        self.quality_tolerance = quality_tolerance
        """Perplexity ratios this close (relative) count as equal quality; among equals the fastest wins,
        which leaves the cores to requests that need them."""
        self.calibration = 1.0
        """Actual latency of recent routed requests over the profiles' prediction (a moving average): predictions
        are scaled by it, so a machine busier than the profiles know sends requests to faster variants (on the
        compute thread's cores, only to ones no dearer at capacity: `_no_dearer_at_capacity`)."""
        self.calibration_smoothing = 0.2
        self.clock = clock
        """Seconds; the clock of arrivals and of the running sequences' deadlines (the engines'
        `time.perf_counter()`; the simulator's virtual clock)."""
        self._lock = threading.Lock()

    def choose(
        self, candidates: Sequence[C], budget: Budget, prompt_tokens: int, max_tokens: int, extra_ms: float = 0.0
    ) -> tuple[list[C], Decision]:
        """Candidates in the order to try (best first; the rest are fallbacks if the first is full). `extra_ms`:
        what the request costs beyond the profiles' figures on any variant (masking its tokens to a grammar:
        a per-token overhead times `max_tokens`), added to every prediction."""
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
        scale = self.calibration
        now = self.clock()
        if self.sharing != "own":
            plan = edf_plan if self.sharing == "deadline" else round_robin_plan
            plans = {
                c.name: plan(candidates, c, prompt_tokens, max_tokens, budget.latency_ms, scale, now) for c in usable
            }
            predicted = {name: plan.finish_ms for name, plan in plans.items()}
            harm = {name: plan.harm for name, plan in plans.items()}
            # what it costs the others: on shared cores the cheapest choice when the cores are busy is the
            # workhorse, the cheapest per request at the batch it would join (`workhorse_ms`)
            cost = {c.name: workhorse_ms(c, prompt_tokens, max_tokens) for c in usable}
        else:
            due = None if budget.latency_ms is None else now + budget.latency_ms / 1000
            predicted = {c.name: predict_ms(c, prompt_tokens, max_tokens, due) * scale for c in usable}
            harm = {c.name: deadline_harm(c, prompt_tokens, now) for c in usable}
            cost = predicted  # a device share of its own: its latency is all it costs
        predicted = {name: ms + extra_ms for name, ms in predicted.items()}
        met: bool | None
        kept = False  # the capacity rule (`_no_dearer_at_capacity`) decided it

        def best_first(group: list[C], tolerance: float) -> list[C]:
            """By quality, then by cost among variants of equal quality (within `tolerance`), then by predicted
            latency. On shared cores the cost is the workhorse's (`workhorse_ms`): by predicted latency an
            idle equal looks faster, and waking it slows every round of the cores."""
            if not group:
                return []
            top = min(ppl_ratio(c) for c in group)
            equal = [c for c in group if ppl_ratio(c) <= top * (1 + tolerance)]
            rest = [c for c in group if c not in equal]
            return sorted(equal, key=lambda c: (cost[c.name], predicted[c.name])) + best_first(rest, tolerance)

        good_enough = [c for c in usable if ppl_ratio(c) <= budget.max_ppl_ratio]
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
            limit = budget.latency_ms
            preferred, anchor = good_enough, None
            if scale > BUSY_CALIBRATION and self.sharing == "deadline":
                preferred, anchor = self._no_dearer_at_capacity(good_enough, predicted, limit)
            set_aside = [c for c in good_enough if c not in preferred]

            def score(c: C) -> tuple[int, int]:
                """Requests kept within budget (this one, minus running ones it would push over), then
                fewer pushed over: earlier requests' budgets are not traded for this one's."""
                return (int(predicted[c.name] <= limit) - harm[c.name], -harm[c.name])

            top = max(score(c) for c in preferred)
            best = [c for c in preferred if score(c) == top]
            fits = [c for c in best if predicted[c.name] <= limit]
            if fits:
                order = best_first(fits, self.quality_tolerance)
                reason = "best quality predicted within the latency budget"
                met = True
            else:
                # none fits: where it costs least (the variant predicted to finish it soonest is often an
                # idle slower one, whose steps then slow every round), unless only steps of its own can make
                # it: then the cheapest whose steps alone (`alone_ms`) make it
                alone = {c.name: alone_ms(c, prompt_tokens, max_tokens) + extra_ms for c in best}
                slow = {name: ms > limit for name, ms in alone.items()}
                order = sorted(best, key=lambda c: (slow[c.name], cost[c.name], predicted[c.name]))
                met = False
                reason = "no variant predicted within the latency budget: fastest"
                # the rule decided it only if a variant it set aside would have scored better
                kept = order[0] is anchor and any(score(c) > top for c in set_aside)
                if kept:
                    reason = (
                        f"busy cores (calibration {scale:.2f}): kept off the variants predicted within the latency "
                        "budget, which serve a row at capacity at a higher cost"
                    )
                elif not slow[order[0].name]:
                    reason += " (the cheapest whose steps alone make it)"
            # fallbacks if the first is full: the rest of the preferred ones before any the rule set aside
            for group in (preferred, set_aside):
                order += sorted((c for c in group if c not in order), key=lambda c: (-score(c)[0], predicted[c.name]))
        if harm[order[0].name]:
            reason += f"; pushes {harm[order[0].name]} running request(s) over their budget"
        chosen = order[0]
        first = {
            c.name: scale * ((0.0 if c.resident else c.profile.load_ms) + c.profile.ttft_ms(prompt_tokens))
            for c in usable
        }
        decision = Decision(
            variant=chosen.name,
            predicted_ms=round(predicted[chosen.name], 1),
            budget_met=met,
            reason=reason,
            candidates={name: round(ms, 1) for name, ms in predicted.items()},
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            budget={k: v for k, v in asdict(budget).items() if v is not None and v != math.inf},
            first_token_ms={c.name: round(min(predicted[c.name], first[c.name]), 1) for c in usable},
            teaches=met is not False or kept,
            scale=scale,
        )
        with self._lock:
            self.decisions.append(decision)
        return order, decision

    def _no_dearer_at_capacity(
        self, group: list[C], predicted: dict[str, float], limit: float
    ) -> tuple[list[C], C | None]:
        """Under a calibration above `BUSY_CALIBRATION` (requests take longer than the profiles predict: load
        they do not see, so the cores are short), a request the best variant is predicted to miss (the
        anchor, returned with the variants) goes only to variants that serve a row at capacity as cheaply
        (`row_at_capacity_ms`): a variant faster alone but dearer at capacity spends the cores that are
        short (docs/BENCHMARKS.md, Routing on the simulator, rule `capacity`). The compute thread's turns
        only: on vLLM's engines the simulator showed no gain."""
        anchor = min(group, key=lambda c: (ppl_ratio(c), c.name))
        if predicted[anchor.name] <= limit:
            return group, None
        ceiling = row_at_capacity_ms(anchor)
        return [c for c in group if row_at_capacity_ms(c) <= ceiling], anchor

    def observe(self, decision: Decision, elapsed_ms: float, tokens: int | None = None) -> None:
        """A routed request finished in `elapsed_ms` after generating `tokens` (None: its full `max_tokens`):
        calibrate later predictions. One that stopped early (a stop string, EOS) is compared with the
        prediction for the tokens it generated (`Decision.expected_ms`), so streamed and short answers teach
        the router as much as full-length ones.

        Profiles time each step alone; what they miss (the event loop's share of the cores, prefills and
        steps of requests that arrive meanwhile, the cores' turns not planned exactly) shows as a ratio
        of actual to predicted latency, followed here as a moving average. The prediction is the decision's
        divided by the calibration it was made under (the profiles' own, but for a masking cost, `extra_ms`,
        which is not scaled): compared with the scaled one, the calibration would settle at the square root of
        the profiles' error.

        A request the router already predicted to miss is left out (unless `Decision.teaches`: the capacity
        rule kept it off variants predicted to fit): once it cannot make its budget the
        compute thread steps it in the background (`BACKGROUND_S`), so its overrun measures that choice,
        not the profiles. Counted, such requests (the fallback lands on the fastest variant) raise the
        calibration, so later budgets the fastest variant could meet look out of reach and fall back to it
        as predicted misses."""
        expected_ms = decision.expected_ms(decision.max_tokens if tokens is None else tokens)
        if expected_ms <= 0 or not decision.teaches:
            return
        ratio = min(max(decision.scale * elapsed_ms / expected_ms, 0.5), 4.0)
        with self._lock:
            self.calibration += self.calibration_smoothing * (ratio - self.calibration)

    def recent(self, count: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(d) for d in list(self.decisions)[-count:]]
