"""A deterministic discrete-event simulation of serving: the real `Scheduler` and the real `Router` on a
virtual clock, each turn charged its cost from the variants' cost profiles.

Where routing and scheduling can be judged: a live run on shared cores mixes every rule's effect with the
host's drift, which moves the share of budgets met more than most rules do, while here the same seed
gives the same numbers to the last digit. The loop is the compute thread's: at each turn every engine with work
reports its urgency (`Scheduler.turn`), `next_turn` picks one, and that engine carries out its scheduler's
plans (`schedule_prefill`, then `schedule_decode`), taking its prefill chunks' and its decode step's time
from its profile; requests arriving meanwhile are routed when the turn ends, as in the server, where the
compute thread cannot be interrupted. Workloads follow DistServe's method: Gamma arrivals (the coefficient
of variation is the burstiness; 1 is Poisson), prompt and output lengths drawn from a range, and each
budget an SLO scale times the request's best unloaded latency (its prefill and steps alone on the
variant fastest for it).

The engines are `sim_engine.SimEngine` (slimserve's transformers engine, as above) or, for a variant whose
`engine` is `vllm`, `sim_vllm.VllmSimEngine`: vLLM's continuous batching on the profile measured through
vLLM (`slimserve profile --backend vllm`), the router's deadlines as its priorities.

No torch and no threads: `slimserve.server.simulator` imports the profile, the scheduler and the router.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimserve.server.predictions import alone_ms
from slimserve.server.profile import VLLM_PROFILE_KEY, CostProfile, combined_sharing
from slimserve.server.router import Budget, Decision, Router
from slimserve.server.scheduler import next_turn
from slimserve.server.sim_engine import SimEngine, SimJob, Variant
from slimserve.server.sim_vllm import VllmSimEngine

POLICIES = ("router", "teacher", "fastest", "random", "fcfs")
"""`router`: the budget router; `teacher`: always the best quality; `fastest`: always the variant fastest
alone for the request; `random`: uniformly among the variants; `fcfs`: the fastest, scheduled without
deadlines (first come, first served admission and whole-batch steps: the scheduler's baseline)."""


@dataclass(frozen=True)
class Workload:
    """A seeded request stream."""

    rate_per_s: float
    count: int = 200
    cv: float = 1.0
    """Coefficient of variation of the gaps between arrivals: 1 is Poisson, above 1 bursty."""
    slo_scale: float = 3.0
    """Each request's budget as a multiple of its best unloaded latency."""
    prompt_tokens: tuple[int, int] = (16, 256)
    output_tokens: tuple[int, int] = (16, 128)
    """Inclusive ranges lengths are drawn from, uniformly."""
    jitter: float = 0.1
    """Coefficient of variation of each turn's cost around its profile's figure (log-normal, seeded): a
    host's turns vary, and the engine's live profile learns from what they cost, as in the server."""
    seed: int = 0


@dataclass(frozen=True)
class Arrival:
    at_s: float
    prompt_tokens: int
    output_tokens: int
    budget_ms: float


def arrivals(workload: Workload, variants: Sequence[Variant]) -> list[Arrival]:
    """The workload's requests, the same for every policy given the seed."""
    rng = random.Random(workload.seed)
    shape = 1 / workload.cv**2  # Gamma gaps with mean 1/rate and this coefficient of variation
    at, made = 0.0, []
    for _ in range(workload.count):
        at += rng.gammavariate(shape, 1 / (workload.rate_per_s * shape))
        prompt = rng.randint(*workload.prompt_tokens)
        output = rng.randint(*workload.output_tokens)
        best = min(_alone_ms(v.profile, prompt, output) for v in variants)
        made.append(Arrival(at, prompt, output, workload.slo_scale * best))
    return made


def _alone_ms(profile: CostProfile, prompt_tokens: int, output_tokens: int) -> float:
    """Unloaded latency: the prefill (which gives the first token) and one step per further token, alone."""
    return profile.ttft_ms(prompt_tokens) + (output_tokens - 1) * profile.step_ms(1)


@dataclass
class Result:
    """One policy on one workload."""

    policy: str
    requests: int
    met: int
    mean_quality: float
    """Mean perplexity ratio of the variants that served (1.0: all by the teacher)."""
    latencies_ms: list[float] = field(default_factory=list)
    """Per request, in order of arrival."""
    served: dict[str, int] = field(default_factory=dict)
    routed: list[str] = field(default_factory=list)
    """Per request, in order of arrival: the variant that served it."""

    @property
    def attainment(self) -> float:
        """Share of requests that finished within their budget."""
        return self.met / self.requests if self.requests else 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


def simulate(
    variants: Sequence[Variant], workload: Workload, policy: str, host_speed: Callable[[float], float] | None = None
) -> Result:
    """Serve `workload` on `variants` under `policy` on a virtual clock; the same inputs give the same result.

    `host_speed`: a turn's cost as a multiple of its profile's figure at each moment (virtual seconds), e.g.
    measured from a live run's turns (`benchmarks/router_bench.py`): the host's slow and fast phases, which
    no profile foresees, replayed, so a live run can be compared with the policy's model apart from them."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    clock = [0.0]
    noise_rng = random.Random(workload.seed + 2)
    sigma = math.sqrt(math.log(1 + workload.jitter**2))  # log-normal with mean 1 and CV `jitter`

    def noise() -> float:
        jitter = math.exp(noise_rng.gauss(-sigma * sigma / 2, sigma)) if sigma else 1.0
        return jitter * (host_speed(clock[0]) if host_speed is not None else 1.0)

    engines = [(VllmSimEngine if v.engine == "vllm" else SimEngine)(v, noise) for v in variants]
    router = Router(sharing=combined_sharing([e.sharing for e in engines]), clock=lambda: clock[0])
    choose = _chooser(policy, engines, router, random.Random(workload.seed + 1))
    pending = list(arrivals(workload, variants))
    pending.reverse()  # popped from the end, in order of arrival
    last_ran = {id(e): 0.0 for e in engines}
    stalled: set[int] = set()  # engines whose turn found nothing to do, until the next arrival (as `compute`)
    done: list[SimJob] = []
    served: dict[str, int] = {}
    while pending or any(e.rows() or e.queue for e in engines):
        while pending and pending[-1].at_s <= clock[0]:
            arrival = pending.pop()
            engine, decision = choose(arrival)
            deadline = None if policy == "fcfs" else arrival.at_s + arrival.budget_ms / 1000
            engine.queue.append(
                SimJob(
                    arrival.prompt_tokens,
                    arrival.output_tokens,
                    deadline,
                    arrival.at_s,
                    arrival.budget_ms,
                    decision,
                    engine.name,
                )
            )
            served[engine.name] = served.get(engine.name, 0) + 1
            stalled.clear()
        turns = [(e, e.turn(clock[0])) for e in engines]
        busy = [(e, t) for e, t in turns if t is not None and id(e) not in stalled]
        if not busy:  # idle (or stuck) until the next arrival
            if not pending:
                break
            clock[0] = max(clock[0], pending[-1].at_s)
            continue
        chosen = busy[next_turn([t for _, t in busy], [last_ran[id(e)] for e, _ in busy], clock[0])][0]
        seconds, finished = chosen.step(clock[0])
        if seconds == 0.0 and not finished:
            stalled.add(id(chosen))
        clock[0] += seconds
        last_ran[id(chosen)] = clock[0]
        for job in finished:
            if job.decision is not None:
                router.observe(job.decision, 1000 * ((job.finished_at or clock[0]) - job.submitted_at), job.generated)
            done.append(job)
    quality = {v.name: v.ppl_ratio for v in variants}
    done.sort(key=lambda j: j.submitted_at)
    latencies = [1000 * ((j.finished_at or 0.0) - j.submitted_at) for j in done]
    met = sum(ms <= j.budget_ms for ms, j in zip(latencies, done, strict=True))
    total = sum(served.values())
    mean_quality = sum(quality[name] * n for name, n in served.items()) / total if total else 0.0
    return Result(
        policy, workload.count, met, mean_quality, latencies, dict(sorted(served.items())), [j.variant for j in done]
    )


def _chooser(
    policy: str, engines: list[SimEngine], router: Router, rng: random.Random
) -> Callable[[Arrival], tuple[SimEngine, Decision | None]]:
    def fastest(arrival: Arrival) -> SimEngine:
        return min(engines, key=lambda e: (alone_ms(e, arrival.prompt_tokens, arrival.output_tokens), e.name))

    def choose(arrival: Arrival) -> tuple[SimEngine, Decision | None]:
        if policy == "router":
            order, decision = router.choose(
                engines, Budget(latency_ms=arrival.budget_ms), arrival.prompt_tokens, arrival.output_tokens
            )
            return order[0], decision
        if policy == "teacher":
            return min(engines, key=lambda e: (e.variant.ppl_ratio, e.name)), None
        if policy == "random":
            return engines[rng.randrange(len(engines))], None
        return fastest(arrival), None  # fastest, fcfs

    return choose


def goodput(results: dict[float, Result], target: float = 0.95) -> float:
    """The highest request rate (of those simulated, per second) at which at least `target` of requests met
    their budget, and every lower rate did too; 0.0 if none did."""
    best = 0.0
    for rate in sorted(results):
        if results[rate].attainment < target:
            break
        best = rate
    return best


PROFILE_FIGURES = ("ttft_ms_128", "decode_tok_s_b1", "decode_tok_s_b8")
"""Manifest figures a variant's cost profile is built from (`CostProfile.from_manifest`)."""


def registered_variants(names: Sequence[str], runtime: str = "transformers") -> list[Variant]:
    """The named variants' cost profiles on `runtime`'s engine (transformers or vllm) from their manifests,
    quality from their perplexity against the first (the teacher). A variant whose manifest lacks that
    runtime's measured profile is an error naming the command that measures it."""
    from slimserve.models.registry import VariantRegistry  # here: the simulator itself needs no registry

    registry = VariantRegistry()
    manifests = [registry.resolve(name).manifest for name in names]
    for manifest in manifests:
        figures = (manifest.metrics.get(VLLM_PROFILE_KEY) or {}) if runtime == "vllm" else manifest.metrics
        missing = [key for key in PROFILE_FIGURES if not figures.get(key)]
        if missing:
            flag, venv = (" --backend vllm", " (from the vLLM venv)") if runtime == "vllm" else ("", "")
            raise ValueError(
                f"{manifest.name} has no measured {runtime} cost profile ({', '.join(missing)}): "
                f"run `slimserve profile {manifest.name}{flag}`{venv} first"
            )
    reference = manifests[0].metrics.get("perplexity")
    variants = []
    for manifest in manifests:
        ppl = manifest.metrics.get("perplexity")
        ratio = float(ppl) / float(reference) if ppl and reference else 1.0
        profile = CostProfile.from_manifest(manifest, runtime)
        variant = Variant(manifest.name, profile, ratio, engine=runtime)
        if runtime == "vllm":
            budget = manifest.metrics[VLLM_PROFILE_KEY].get("max_num_batched_tokens")
            variant = dataclasses.replace(variant, max_num_batched_tokens=int(budget or variant.max_num_batched_tokens))
        variants.append(variant)
    return variants


@dataclass
class GridConfig:
    """The workloads `slimserve simulate` serves under each policy: every rate x SLO scale x burstiness,
    each with `count` requests per seed."""

    rates: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.8])
    """Request rates (per second)."""
    slo_scales: list[float] = field(default_factory=lambda: [2.0, 3.0, 5.0])
    """Each request's budget as a multiple of its best unloaded latency."""
    cvs: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Burstiness: coefficient of variation of the gaps between arrivals (1: Poisson, above 1: bursty)."""
    count: int = 200
    """Requests per cell and seed."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Workload seeds; a cell's figures pool them. The same seeds give the same numbers on any machine."""
    jitter: float = 0.1
    """Coefficient of variation of each turn's cost around the profile (0: every turn costs the profile's figure)."""
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    """Policies compared, in the order of the table's columns."""

    def __post_init__(self) -> None:
        for flag, values in (("--rates", self.rates), ("--slo-scales", self.slo_scales), ("--cvs", self.cvs)):
            if not values or any(v <= 0 for v in values):
                raise ValueError(f"{flag} must be positive numbers, got {values}")
        if self.count < 1:
            raise ValueError(f"--count must be at least 1, got {self.count}")
        if self.jitter < 0:
            raise ValueError(f"--jitter must be at least 0, got {self.jitter}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"--policies must be among {', '.join(POLICIES)}, got {self.policies}")


@dataclass(frozen=True)
class Cell:
    """One policy on one workload of the grid, its seeds pooled."""

    policy: str
    cv: float
    slo_scale: float
    rate: float
    result: Result

    def figures(self) -> dict[str, float | str]:
        return {
            "policy": self.policy,
            "cv": self.cv,
            "slo_scale": self.slo_scale,
            "rate": self.rate,
            "attainment": self.result.attainment,
            "mean_quality": self.result.mean_quality,
            "p50_ms": self.result.percentile_ms(0.5),
            "p90_ms": self.result.percentile_ms(0.9),
        }


def run_grid(variants: Sequence[Variant], grid: GridConfig) -> list[Cell]:
    """Every cell of `grid` under every policy, in the table's order (burstiness, SLO scale, rate, policy)."""
    cells = []
    for cv in grid.cvs:
        for scale in grid.slo_scales:
            for rate in grid.rates:
                for policy in grid.policies:
                    results = [
                        simulate(variants, Workload(rate, grid.count, cv, scale, jitter=grid.jitter, seed=seed), policy)
                        for seed in grid.seeds
                    ]
                    pooled = Result(
                        policy,
                        sum(r.requests for r in results),
                        sum(r.met for r in results),
                        sum(r.mean_quality for r in results) / len(results),
                        [ms for r in results for ms in r.latencies_ms],
                    )
                    cells.append(Cell(policy, cv, scale, rate, pooled))
    return cells


def grid_table(variants: Sequence[Variant], cells: Sequence[Cell]) -> list[str]:
    """SLO attainment and mean quality per policy and cell (a Markdown table), then goodput per policy."""
    policies = list(dict.fromkeys(c.policy for c in cells))
    lines = [
        f"variants: {', '.join(f'{v.name} (ppl x{v.ppl_ratio:.3f})' for v in variants)}",
        "| cv | SLO scale | rate/s | " + " | ".join(policies) + " |",
        "|---" * (3 + len(policies)) + "|",
    ]
    rows: dict[tuple[float, float, float], list[str]] = {}
    by_policy: dict[tuple[str, float, float], dict[float, Result]] = {}
    for cell in cells:
        text = f"{cell.result.attainment:.1%} q{cell.result.mean_quality:.3f}"
        rows.setdefault((cell.cv, cell.slo_scale, cell.rate), []).append(text)
        by_policy.setdefault((cell.policy, cell.cv, cell.slo_scale), {})[cell.rate] = cell.result
    lines += [f"| {cv:g} | {scale:g} | {rate:g} | " + " | ".join(row) + " |" for (cv, scale, rate), row in rows.items()]
    lines += ["", "goodput at 95% attainment (requests/s; 0: not even the lowest rate)"]
    lines += [
        f"  {policy:>8}  cv {cv:g}  SLO x{scale:g}: {goodput(results):g}"
        for (policy, cv, scale), results in by_policy.items()
    ]
    return lines


def save_profiles(variants: Sequence[Variant], measured_on: str, path: Path) -> None:
    """The variants as served (profiles as measured, quality, engine limits) and the machine that measured
    them, for `benchmarks/simulate.py --profiles`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"measured_on": measured_on, "variants": [dataclasses.asdict(v) for v in variants]}
    path.write_text(json.dumps(saved, indent=1) + "\n")


def load_profiles(path: Path) -> tuple[list[Variant], str]:
    """Variants saved by `save_profiles` and the machine that measured them; an unreadable file is an error
    naming it."""
    try:
        saved = json.loads(path.read_text())
        variants = []
        for entry in saved["variants"]:
            figures: dict[str, Any] = {
                key: tuple(tuple(point) for point in value) if key.endswith("_points") else value
                for key, value in entry["profile"].items()
            }
            variants.append(Variant(**{**entry, "profile": CostProfile(**figures)}))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: not a profiles file written by benchmarks/simulate.py ({exc})") from exc
    if not variants:
        raise ValueError(f"{path}: no variants")
    return variants, str(saved.get("measured_on", "unknown"))
