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

No torch and no threads: `slimserve.server.simulator` imports the profile, the scheduler and the router.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slimserve.server.predictions import alone_ms
from slimserve.server.profile import CostProfile
from slimserve.server.router import Budget, Decision, Router
from slimserve.server.scheduler import Scheduler, next_chunk_tokens, next_turn, prefill_chunks

POLICIES = ("router", "teacher", "fastest", "random", "fcfs")
"""`router`: the budget router; `teacher`: always the best quality; `fastest`: always the variant fastest
alone for the request; `random`: uniformly among the variants; `fcfs`: the fastest, scheduled without
deadlines (first come, first served admission and whole-batch steps: the scheduler's baseline)."""


@dataclass(frozen=True)
class Variant:
    """A variant as the simulator serves it: its cost profile and its quality."""

    name: str
    profile: CostProfile
    ppl_ratio: float
    """Held-out perplexity as a ratio to the teacher's (1.0: the teacher)."""
    memory_mb: float = 0.0
    max_batch_size: int = 16


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


@dataclass(eq=False)
class _Job:
    """A request as the scheduler sees it (`scheduler.Job`)."""

    prompt_tokens: int
    max_tokens: int
    deadline: float | None
    submitted_at: float
    budget_ms: float
    decision: Decision | None = None
    variant: str = ""
    generated: int = 0
    last_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def steps_left(self) -> int:
        return self.max_tokens - self.generated

    @property
    def done(self) -> bool:
        return self.finished_at is not None


class _Engine:
    """One variant's engine on the virtual clock: what `TransformersEngine` does with its scheduler's plans,
    with every forward replaced by its profile's time. Also the router's `Candidate`."""

    def __init__(self, variant: Variant, noise: Callable[[], float] = lambda: 1.0) -> None:
        self.variant = variant
        self.truth = variant.profile
        """What turns cost (times `noise`); `profile` is the live copy the router and scheduler read."""
        self.profile = dataclasses.replace(variant.profile)
        self.noise = noise
        self.scheduler: Scheduler[_Job] = Scheduler(variant.max_batch_size, self.profile)
        self.queue: list[_Job] = []
        self.main: list[_Job] = []
        self.apart: list[_Job] = []
        self.partial: tuple[_Job, int] | None = None

    # ---- the router's view (`predictions.Candidate`) ----------------------------------------------

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def memory_mb(self) -> float:
        return self.variant.memory_mb

    @property
    def ppl_ratio(self) -> float | None:
        return self.variant.ppl_ratio

    @property
    def max_batch_size(self) -> int:
        return self.variant.max_batch_size

    @property
    def resident(self) -> bool:
        return True

    @property
    def available(self) -> bool:
        return True

    @property
    def running(self) -> int:
        return len(self.rows())

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def deadlines(self) -> list[tuple[float | None, int]]:
        return [(j.deadline, j.steps_left) for j in self.rows()]

    def rows(self) -> list[_Job]:
        return [*self.main, *self.apart, *([self.partial[0]] if self.partial is not None else [])]

    # ---- turns ------------------------------------------------------------------------------------

    def step(self, now: float) -> tuple[float, list[_Job]]:
        """Carry out one turn from `now`: seconds it took and the requests it finished."""
        plan = self.scheduler.schedule_prefill(self.queue, self.rows(), self.partial, now)
        spent, finished = 0.0, []
        if plan.jump is not None:
            self.queue.remove(plan.jump)
            spent += self._prefill_s(plan.jump.prompt_tokens, plan.jump.prompt_tokens, last=True)
            finished += self._first_token(plan.jump, now + spent)
        if plan.chunk and self.partial is not None:
            job, done = self.partial
            chunk = next_chunk_tokens(job.prompt_tokens, done)
            spent += self._prefill_s(job.prompt_tokens, chunk, last=done + chunk >= job.prompt_tokens)
            self.partial = (job, done + chunk)
            if done + chunk >= job.prompt_tokens:
                self.partial = None
                finished += self._first_token(job, now + spent)
        for job in plan.start:
            self.queue.remove(job)
            first = prefill_chunks(job.prompt_tokens)[0]
            spent += self._prefill_s(job.prompt_tokens, first, last=first >= job.prompt_tokens)
            if first < job.prompt_tokens:
                self.partial = (job, first)
            else:
                finished += self._first_token(job, now + spent)
        apart = self.scheduler.schedule_decode(self.main, self.apart, now + spent)
        if apart is None:
            self.main, self.apart = [*self.main, *self.apart], []
            stepped = self.main
        else:
            chosen = set(apart)
            everyone = [*self.main, *self.apart]
            self.main = [j for j in everyone if j not in chosen]
            self.apart = [j for j in everyone if j in chosen]
            stepped = self.apart
        if stepped:
            step_s = self.truth.step_ms(len(stepped)) / 1000 * self.noise()
            self.profile.observe_step(len(stepped), step_s)
            spent += step_s
            for job in stepped:
                job.generated += 1
                job.last_token_at = now + spent
                if job.generated >= job.max_tokens:
                    job.finished_at = now + spent
                    finished.append(job)
            self.main = [j for j in self.main if not j.done]
            self.apart = [j for j in self.apart if not j.done]
        return spent, finished

    def _prefill_s(self, prompt_tokens: int, chunk_tokens: int, last: bool) -> float:
        """A chunk's share of the whole prefill's true cost; the live profile learns a whole prefill once, at
        its last chunk, as the engine does."""
        whole_s = self.truth.ttft_ms(prompt_tokens) / 1000 * self.noise()
        if last:
            self.profile.observe_prefill(prompt_tokens, whole_s)
        return whole_s * chunk_tokens / max(prompt_tokens, 1)

    def _first_token(self, job: _Job, at: float) -> list[_Job]:
        """The prefill's token: the job joins the batch, or is done if it wanted one token."""
        job.generated, job.last_token_at = 1, at
        if job.generated >= job.max_tokens:
            job.finished_at = at
            return [job]
        self.main.append(job)
        return []


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


def simulate(variants: Sequence[Variant], workload: Workload, policy: str) -> Result:
    """Serve `workload` on `variants` under `policy` on a virtual clock; the same inputs give the same result."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    clock = [0.0]
    noise_rng = random.Random(workload.seed + 2)
    sigma = math.sqrt(math.log(1 + workload.jitter**2))  # log-normal with mean 1 and CV `jitter`

    def noise() -> float:
        return math.exp(noise_rng.gauss(-sigma * sigma / 2, sigma)) if sigma else 1.0

    engines = [_Engine(v, noise) for v in variants]
    router = Router(shared_compute=True, clock=lambda: clock[0])
    choose = _chooser(policy, engines, router, random.Random(workload.seed + 1))
    pending = list(arrivals(workload, variants))
    pending.reverse()  # popped from the end, in order of arrival
    last_ran = {id(e): 0.0 for e in engines}
    stalled: set[int] = set()  # engines whose turn found nothing to do, until the next arrival (as `compute`)
    done: list[_Job] = []
    served: dict[str, int] = {}
    while pending or any(e.rows() or e.queue for e in engines):
        while pending and pending[-1].at_s <= clock[0]:
            arrival = pending.pop()
            engine, decision = choose(arrival)
            deadline = None if policy == "fcfs" else arrival.at_s + arrival.budget_ms / 1000
            engine.queue.append(
                _Job(
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
        turns = [(e, e.scheduler.turn(e.queue, e.rows(), e.partial, clock[0])) for e in engines]
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
    policy: str, engines: list[_Engine], router: Router, rng: random.Random
) -> Callable[[Arrival], tuple[_Engine, Decision | None]]:
    def fastest(arrival: Arrival) -> _Engine:
        return min(engines, key=lambda e: (alone_ms(e, arrival.prompt_tokens, arrival.output_tokens), e.name))

    def choose(arrival: Arrival) -> tuple[_Engine, Decision | None]:
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


def registered_variants(names: Sequence[str]) -> list[Variant]:
    """The named variants' cost profiles from their manifests, quality from their perplexity against the
    first (the teacher). A variant whose manifest lacks a measured profile is an error naming it."""
    from slimserve.models.registry import VariantRegistry  # here: the simulator itself needs no registry

    registry = VariantRegistry()
    manifests = [registry.resolve(name).manifest for name in names]
    for manifest in manifests:
        missing = [key for key in PROFILE_FIGURES if not manifest.metrics.get(key)]
        if missing:
            raise ValueError(
                f"{manifest.name} has no measured cost profile ({', '.join(missing)}): "
                f"run `slimserve profile {manifest.name}` first"
            )
    reference = manifests[0].metrics.get("perplexity")
    variants = []
    for manifest in manifests:
        ppl = manifest.metrics.get("perplexity")
        ratio = float(ppl) / float(reference) if ppl and reference else 1.0
        variants.append(Variant(manifest.name, CostProfile.from_manifest(manifest), ratio))
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
