"""Routing benchmark: one mixed workload replayed against four policies on the same server.

    python benchmarks/router_bench.py [--variants NAME_OR_DIR ...] [--requests 60] [--rate 0.3 0.6] [--load 0.5]
                                      [--seed 0 1] [--policies router smallest ...] [--write FILE]

The server serves the default teacher and compressed variants of it (default: the measured variants of the
teacher that `make compress` registered, else the int8 and int4 variants `make bench-quant` leaves in
`$SLIMSERVE_HOME/bench`; their manifests carry measured quality and speed).
The workload is seeded: Poisson arrivals (at each given rate: a moderate load and one near what the
cores can serve), prompts of 10-250 tokens cut from held-out text, max_tokens of
16-128, and a latency budget per request drawn log-uniformly from tight to loose. `--load U` adds the rate
at which the requests would keep the fastest variant busy a share U of the time if each ran alone (measured
on this machine before the runs), so one figure of load means the same on a slower CPU. Policies:
  router    model=auto with the budget in X-Latency-Budget-Ms
  teacher   always the teacher, by name
  smallest  always the smallest variant, by name
  random    a uniformly random variant, by name
Each seed is a different workload replayed against every policy: figures pool all seeds' requests, and the
router's and always-smallest's share per seed is listed too (two cores drift, so one replay proves little).
A request is "feasible" when some variant alone on the server would meet its budget: time to first token as
a function of prompt length, then time per token at batch 1, each the median of measurements taken before
the first seed and after each seed's replays (a single measurement is one phase of cores that drift: on an
AVX2 machine the int4 student's batch-1 step moved between 26 and 44 ms within two minutes, standalone, and
a run's one measurement, at 29.9 ms, put the line a median 1.3x below what its requests took alone). That is
still a prediction from a few requests, so
`--alone` (on by default) also replays each seed's requests one at a time, nothing else in flight, each on
the variant predicted fastest for it: "met alone" is the set of budgets that replay met, measured rather
than predicted, and each policy's share of it is reported beside the feasible one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Any

from openai import AsyncOpenAI
from report import machine, today, write_section
from serve_bench import free_port, wait_healthy

from slimserve.compression.data import eval_text
from slimserve.models import DEFAULT_VARIANT, VariantManifest, VariantRegistry, slimserve_home

POLICIES = ("router", "teacher", "smallest", "random")
ROOMY = 1.5
"""Budgets at least this multiple of the best unloaded latency are also reported apart: a budget within a few
percent of what one variant does alone is met only when nothing else runs, whatever the policy."""
DUMP: list[dict[str, Any]] | None = None
"""Per request outcomes (with the router's prediction), when --dump is given."""


@dataclass
class Job:
    at: float
    prompt: str
    max_tokens: int
    budget_ms: float


@dataclass
class Outcome:
    rate: float
    policy: str
    variant: str
    latency_ms: float
    budget_ms: float
    quality: float
    slack: float
    """Budget / the best unloaded latency of any variant for this request (>= 1: feasible)."""
    seed: int = 0
    met_alone: bool | None = None
    """Whether the same request, replayed alone on the variant predicted fastest for it, met its budget
    (None: not replayed)."""

    @property
    def feasible(self) -> bool:
        return self.slack >= 1


def workload(count: int, rate: float, seed: int, tight_ms: float, loose_ms: float) -> list[Job]:
    rng = random.Random(seed)
    words = eval_text().split()
    jobs, clock = [], 0.0
    for _ in range(count):
        clock += rng.expovariate(rate)
        start = rng.randrange(0, len(words) - 300)
        length = int(math.exp(rng.uniform(math.log(8), math.log(180))))  # words; ~1.3 tokens each
        prompt = " ".join(words[start : start + length])
        budget = math.exp(rng.uniform(math.log(tight_ms), math.log(loose_ms)))
        jobs.append(Job(clock, prompt, rng.choice([16, 32, 64, 128]), budget))
    return jobs


async def timed(client: AsyncOpenAI, model: str, job: Job, headers: dict[str, str]) -> tuple[str, float, int]:
    """(variant that served, latency ms, prompt tokens) of one chat request."""
    started = time.perf_counter()
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": job.prompt}],
        max_tokens=job.max_tokens,
        temperature=0,
        extra_headers=headers,
        # every request runs to max_tokens: variants stop at EOS at different points, and a policy whose
        # variant stops early would look faster for doing less work (`ignore_eos` as in vLLM)
        extra_body={"ignore_eos": True},
    )
    completion = raw.parse()
    elapsed = 1000 * (time.perf_counter() - started)
    if DUMP is not None:
        DUMP.append(
            {
                "variant": completion.model,
                "ms": round(elapsed),
                "predicted_ms": raw.headers.get("x-slimserve-predicted-ms"),
                "budget_ms": round(job.budget_ms) if job.budget_ms else None,  # every policy's job has one
                "max_tokens": job.max_tokens,
                "completion_tokens": completion.usage.completion_tokens if completion.usage else None,
                "at": round(job.at, 2),
                "start_pc": round(started, 3),
                "routing": raw.headers.get("x-slimserve-budget"),
                "reason": raw.headers.get("x-slimserve-route-reason"),
                "prompt_tokens": completion.usage.prompt_tokens if completion.usage else None,
                "sequences": raw.headers.get("x-slimserve-sequences"),  # as --trace-turns names them
            }
        )
    return completion.model, elapsed, completion.usage.prompt_tokens if completion.usage else 0


async def replay_alone(base: str, jobs: list[Job], variants: list[str]) -> list[tuple[str, float, int]]:
    """The jobs one after another, nothing else in flight, job i on `variants[i]`."""
    client = AsyncOpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
    results = [await timed(client, variant, job, {}) for job, variant in zip(jobs, variants, strict=True)]
    await client.close()
    return results


async def replay(
    base: str, policy: str, jobs: list[Job], names: dict[str, str], seed: int
) -> list[tuple[str, float, int]]:
    client = AsyncOpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
    rng = random.Random(seed)
    variants = [names["teacher"], *names["others"]]
    started = time.perf_counter()

    async def one(job: Job) -> tuple[str, float, int]:
        await asyncio.sleep(max(0.0, job.at - (time.perf_counter() - started)))
        if policy == "router":
            return await timed(client, "auto", job, {"X-Latency-Budget-Ms": f"{job.budget_ms:.0f}"})
        model = {"teacher": names["teacher"], "smallest": names["smallest"]}.get(policy) or rng.choice(variants)
        return await timed(client, model, job, {})

    results = await asyncio.gather(*(one(job) for job in jobs))
    await client.close()
    return list(results)


@dataclass
class Alone:
    """One variant's unloaded latency: time to first token linear in prompt tokens, then per output token."""

    ttft_base_ms: float
    ttft_per_prompt_token_ms: float
    per_token_ms: float

    def latency_ms(self, prompt_tokens: int, max_tokens: int) -> float:
        ttft = self.ttft_base_ms + self.ttft_per_prompt_token_ms * prompt_tokens
        return ttft + (max_tokens - 1) * self.per_token_ms

    @classmethod
    def median_of(cls, samples: list[Alone]) -> Alone:
        """Each figure's median over measurements taken at different times of a run."""
        return cls(
            median(a.ttft_base_ms for a in samples),
            median(a.ttft_per_prompt_token_ms for a in samples),
            median(a.per_token_ms for a in samples),
        )

    @classmethod
    def from_timings(cls, short: tuple[float, int], long: tuple[float, int], many_ms: float) -> Alone:
        """From (ms, prompt tokens) of one-token requests with a short and a long prompt, and the short prompt
        run to 64 tokens."""
        slope = max(long[0] - short[0], 0.0) / max(long[1] - short[1], 1)
        return cls(short[0] - slope * short[1], slope, (many_ms - short[0]) / 63)


def measure_unloaded(base: str, names: list[str], rounds: list[dict[str, Alone]]) -> dict[str, Alone]:
    """One more round of every variant's unloaded latency (`unloaded`), appended to `rounds`; the median of all
    rounds so far."""
    rounds.append({name: asyncio.run(unloaded(base, name)) for name in names})
    shown = {
        k: [round(a.ttft_base_ms, 1), round(a.ttft_per_prompt_token_ms, 3), round(a.per_token_ms, 1)]
        for k, a in rounds[-1].items()
    }
    print(f"   unloaded (TTFT ms + ms per prompt token, ms per output token): {json.dumps(shown)}", flush=True)
    for row in DUMP or []:  # the unloaded measurements are not part of any policy's replay
        for key, value in (("policy", "unloaded"), ("rate", None), ("seed", None)):
            row.setdefault(key, value)
    return {name: Alone.median_of([r[name] for r in rounds]) for name in names}


async def unloaded(base: str, model: str) -> Alone:
    """A variant alone: one-token requests with a short and a long prompt, then 64 tokens (ignore_eos)."""
    client = AsyncOpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
    short = "Explain what a hash table is."
    long = " ".join(eval_text().split()[:220])
    await timed(client, model, Job(0, short, 1, 0), {})  # warm-up
    _, short_ms, short_tokens = await timed(client, model, Job(0, short, 1, 0), {})
    _, long_ms, long_tokens = await timed(client, model, Job(0, long, 1, 0), {})
    _, many_ms, _ = await timed(client, model, Job(0, short, 64, 0), {})
    await client.close()
    return Alone.from_timings((short_ms, short_tokens), (long_ms, long_tokens), many_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None, help="compressed variants (names or directories)")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, nargs="+", default=None, help="mean arrivals per second (each)")
    parser.add_argument(
        "--load",
        type=float,
        nargs="+",
        default=[],
        help="offered load: share of the time the fastest variant alone is busy",
    )
    parser.add_argument("--tight-ms", type=float, default=800)
    parser.add_argument("--loose-ms", type=float, default=12000)
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="one workload per seed")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="policies to run")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--dump", type=Path, default=None, help="write every request's outcome here (JSON lines)")
    parser.add_argument(
        "--trace-turns", type=Path, default=None, help="the server writes every compute turn here (JSON lines)"
    )
    parser.add_argument(
        "--alone",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay each seed's requests one at a time on the variant predicted fastest for each (met alone)",
    )
    args = parser.parse_args()
    global DUMP
    DUMP = [] if args.dump else None

    registry = VariantRegistry()
    teacher = registry.resolve(DEFAULT_VARIANT)
    others = args.variants or default_variants(registry, teacher.name)
    manifests = {str(Path(o)): VariantManifest.read(Path(o)) for o in others}
    missing = [o for o, m in manifests.items() if "perplexity" not in m.metrics]
    if missing:
        print(f"variants without measured quality (run make bench-quant first): {missing}", file=sys.stderr)
        return 2
    quality = {m.name: m.metrics["perplexity"] / m.metrics["teacher_perplexity"] for m in manifests.values()}
    quality[teacher.name] = 1.0
    sizes = {m.name: m.size_bytes for m in manifests.values()}
    smallest = min(sizes, key=lambda n: sizes[n])
    names = {"teacher": teacher.name, "others": [m.name for m in manifests.values()], "smallest": smallest}

    port = free_port()
    command = [sys.executable, "-m", "slimserve", "serve", "--port", str(port), "--variant", teacher.name]
    for other in others:
        command += ["--variant", other]
    if args.trace_turns:
        command += ["--trace-turns", str(args.trace_turns)]
    print("==", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    outcomes: list[Outcome] = []
    served: list[tuple[list[Outcome], list[tuple[int, int]]]] = []  # each replay's outcomes, (prompt, max) tokens
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        rounds: list[dict[str, Alone]] = []
        alone = measure_unloaded(base, [teacher.name, *names["others"]], rounds)
        tokens = prompt_tokens_of(str(teacher.path))
        args.rate = (args.rate or ([] if args.load else [0.3, 0.6])) + [
            rate_for_load(load, alone, args, tokens) for load in args.load
        ]
        print(f"   rates: {args.rate} /s", flush=True)
        for seed in args.seed:
            met_alone: list[bool | None] = [None] * args.requests
            if args.alone:  # arrival times do not matter one at a time: one replay serves every rate
                jobs = workload(args.requests, 1.0, seed, args.tight_ms, args.loose_ms)
                fastest = [fastest_alone(alone, tokens(job), job.max_tokens) for job in jobs]
                results = asyncio.run(replay_alone(base, jobs, fastest))
                met_alone = [latency <= job.budget_ms for job, (_, latency, _) in zip(jobs, results, strict=True)]
                for row in DUMP or []:
                    row.setdefault("rate", None)
                    row.setdefault("policy", "alone")
                    row.setdefault("seed", seed)
                print(f"   seed {seed} alone: {sum(map(bool, met_alone))}/{len(jobs)} budgets met", flush=True)
            for rate in args.rate:
                jobs = workload(args.requests, rate, seed, args.tight_ms, args.loose_ms)
                for policy in args.policies:
                    results = asyncio.run(replay(base, policy, jobs, names, seed))
                    for row in DUMP or []:
                        row.setdefault("rate", rate)
                        row.setdefault("policy", policy)
                        row.setdefault("seed", seed)
                    rows = [
                        Outcome(rate, policy, variant, latency, job.budget_ms, quality[variant], 0.0, seed, alone_met)
                        for job, (variant, latency, _), alone_met in zip(jobs, results, met_alone, strict=True)
                    ]
                    lengths = [(prompt, job.max_tokens) for job, (_, _, prompt) in zip(jobs, results, strict=True)]
                    served.append((rows, lengths))
                    set_slack(rows, lengths, alone)  # by the measurements so far; set again at the end
                    print(f"   seed {seed} {rate}/s {policy}: {summary(rows)}", flush=True)
                    outcomes += rows
            alone = measure_unloaded(base, [teacher.name, *names["others"]], rounds)
        for rows, lengths in served:  # by the median of every round of unloaded measurements
            set_slack(rows, lengths, alone)
        state = json.loads(__import__("httpx").get(f"http://127.0.0.1:{port}/v1/slimserve/router", timeout=10).text)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()

    if args.dump and DUMP is not None:
        args.dump.write_text("".join(json.dumps(row) + "\n" for row in DUMP))
    body = render(outcomes, args, names, quality, state)
    print(body)
    if args.write:
        write_section(args.write, "router-bench", body)
        print(f"wrote {args.write}")
    return 0


def prompt_tokens_of(tokenizer_dir: str) -> Callable[[Job], int]:
    """A job's prompt length in tokens, as the server counts it (the chat template applied)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(job: Job) -> int:
        messages = [{"role": "user", "content": job.prompt}]
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    return count


def set_slack(outcomes: list[Outcome], lengths: list[tuple[int, int]], alone: dict[str, Alone]) -> None:
    """Each outcome's budget over the least unloaded latency of any variant for its (prompt, max) tokens."""
    for outcome, (prompt_tokens, max_tokens) in zip(outcomes, lengths, strict=True):
        outcome.slack = outcome.budget_ms / min(a.latency_ms(prompt_tokens, max_tokens) for a in alone.values())


def fastest_alone(alone: dict[str, Alone], prompt_tokens: int, max_tokens: int) -> str:
    """The variant whose unloaded latency for these lengths is least."""
    return min(alone, key=lambda name: alone[name].latency_ms(prompt_tokens, max_tokens))


def rate_for_load(
    load: float, alone: dict[str, Alone], args: argparse.Namespace, tokens: Callable[[Job], int]
) -> float:
    """Arrivals per second at which the workload's requests, each on whichever variant alone serves it
    soonest, would keep the cores busy a share `load` of the time (the mean of that least latency sets it;
    a workload's requests do not depend on its rate, only their arrival times scale)."""
    least_s = []
    for seed in args.seed:
        for job in workload(args.requests, 1.0, seed, args.tight_ms, args.loose_ms):
            least_s.append(min(a.latency_ms(tokens(job), job.max_tokens) for a in alone.values()) / 1000)
    return round(load / mean(least_s), 3)


def default_variants(registry: VariantRegistry, teacher: str) -> list[str]:
    """The teacher's measured variants in the registry (what `make compress` leaves), else `make bench-quant`'s."""
    registered = [
        str(v.path)
        for v in registry.list()
        if v.manifest.family == teacher and v.name != teacher and "perplexity" in v.manifest.metrics
    ]
    if len(registered) >= 3:
        return registered
    bench = slimserve_home() / "bench" / "variants"
    return [str(bench / f"{teacher}-{suffix}") for suffix in ("int8-weight-emb8", "int4-gptq-emb8", "int8-dynamic")]


def summary(rows: list[Outcome]) -> dict[str, Any]:
    feasible = [o for o in rows if o.feasible]
    roomy = [o for o in rows if o.slack >= ROOMY]
    met_alone = [o for o in rows if o.met_alone]
    return {
        "within_budget_met_alone": sum(o.latency_ms <= o.budget_ms for o in met_alone) / max(len(met_alone), 1),
        "met_alone": len(met_alone),
        "within_budget": sum(o.latency_ms <= o.budget_ms for o in rows) / len(rows),
        "within_budget_feasible": sum(o.latency_ms <= o.budget_ms for o in feasible) / max(len(feasible), 1),
        "feasible": len(feasible),
        "within_budget_roomy": sum(o.latency_ms <= o.budget_ms for o in roomy) / max(len(roomy), 1),
        "roomy": len(roomy),
        "mean_quality": mean(o.quality for o in rows),
        "median_latency_ms": median(o.latency_ms for o in rows),
        "served": {v: sum(o.variant == v for o in rows) for v in sorted({o.variant for o in rows})},
    }


SLACK_BINS = (1.0, 1.2, 1.5, 2.0, 4.0, math.inf)
"""Edges of the rows of `by_slack`: budget / the best unloaded latency."""


def by_slack(outcomes: list[Outcome], rates: list[float], policies: list[str]) -> list[str]:
    """Requests within budget / requests, per rate and slack bin, for each policy: where the misses are. A
    budget within a few tenths of what the fastest variant does alone is met only when nothing else runs."""
    lines = [
        "| rate | slack (budget / best unloaded) | " + " | ".join(policies) + " |",
        "|---:|---|" + "---:|" * len(policies),
    ]
    for rate in rates:
        for low, high in itertools.pairwise(SLACK_BINS):
            cells = []
            for policy in policies:
                rows = [o for o in outcomes if o.rate == rate and o.policy == policy and low <= o.slack < high]
                cells.append(f"{sum(o.latency_ms <= o.budget_ms for o in rows)}/{len(rows)}")
            span = f"{low:g}-{high:g}" if high != math.inf else f">= {low:g}"
            lines.append(f"| {rate}/s | {span} | " + " | ".join(cells) + " |")
    return lines


def verdict(outcomes: list[Outcome], rate: float) -> str:
    """The issue's goal, said plainly from the figures at one arrival rate: >= 95% of feasible requests
    within budget, with a better (lower) mean quality ratio than always-smallest."""
    outcomes = [o for o in outcomes if o.rate == rate]
    by_policy = {
        p: summary([o for o in outcomes if o.policy == p]) for p in POLICIES if any(o.policy == p for o in outcomes)
    }
    if "router" not in by_policy:
        return "Goal: not assessed (the router policy was not run)."
    router = by_policy["router"]
    hit, quality = router["within_budget_feasible"], router["mean_quality"]
    parts = [
        f"router {hit:.1%} of feasible requests within budget ({router['within_budget_roomy']:.1%} of roomy ones"
        + (f", {router['within_budget_met_alone']:.1%} of those met alone" if router["met_alone"] else "")
        + f") at mean quality {quality:.3f}"
    ]
    better_quality: bool | None = None
    if "smallest" in by_policy:
        smallest = by_policy["smallest"]
        better_quality = quality < smallest["mean_quality"]
        parts.append(
            f"always-smallest {smallest['within_budget_feasible']:.1%} ({smallest['within_budget_roomy']:.1%}"
            + (f", {smallest['within_budget_met_alone']:.1%}" if smallest["met_alone"] else "")
            + f") at {smallest['mean_quality']:.3f}"
        )
    met = hit >= 0.95 and better_quality is not False
    status = "met" if met and better_quality else ("NOT met" if not met else "met for budgets (quality not compared)")
    goal = f"At {rate}/s, goal (>= 95% of feasible requests within budget, better quality than always-smallest)"
    return f"{goal}: **{status}**: {'; '.join(parts)}."


def render(
    outcomes: list[Outcome],
    args: argparse.Namespace,
    names: dict[str, Any],
    quality: dict[str, float],
    state: dict[str, Any],
) -> str:
    lines = [
        "## Routing: `make bench-router`",
        "",
        f"- command: `python benchmarks/router_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {today()}",
        f"- machine: {machine()}",
        f"- server: the teacher and {', '.join(names['others'])}, all resident; quality = held-out perplexity "
        "/ the teacher's: " + ", ".join(f"{n} {q:.3f}" for n, q in sorted(quality.items(), key=lambda kv: kv[1])),
        f"- workload: {args.requests} chat requests per seed ({', '.join(map(str, args.seed))}), "
        f"Poisson arrivals at {' and '.join(map(str, args.rate))}/s"
        + (f" (the last {len(args.load)}: offered load {', '.join(map(str, args.load))})" if args.load else "")
        + ", "
        "prompts of 8-180 words of held-out text, max_tokens in {16, 32, 64, 128} (ignore_eos: each runs to its "
        "max_tokens), latency budgets log-uniform in "
        f"[{args.tight_ms:.0f}, {args.loose_ms:.0f}] ms, greedy; each seed's workload is replayed against every "
        "policy; figures pool the seeds (per seed: the feasible share, in seed order).",
        "- feasible: some variant alone on the server would meet the budget: for this request's prompt length "
        "and max_tokens, the least of every variant's unloaded latency (TTFT linear in prompt tokens from a short "
        "and a 220-word prompt, plus max_tokens - 1 steps at batch 1; each figure the median of "
        f"{len(args.seed) + 1} measurements, before the first seed and after each seed's replays). Roomy: the "
        f"budget is at least {ROOMY:g}x that least latency."
        + (
            " Met alone: the budgets the same requests met when replayed one at a time, nothing else in flight, "
            "each on the variant predicted fastest for it."
            if args.alone
            else ""
        ),
        "",
        "| rate | policy | within budget (all) | within budget (feasible) | within budget (roomy) "
        "| within budget (met alone) | mean quality ratio | median latency ms | feasible, per seed | served |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for rate in args.rate:
        for policy in args.policies:
            s = summary([o for o in outcomes if o.policy == policy and o.rate == rate])
            served = ", ".join(f"{v.replace(names['teacher'], 'T')}: {c}" for v, c in s["served"].items())
            per_seed = ", ".join(
                f"{summary(of_seed)['within_budget_feasible']:.0%}"
                for seed in args.seed
                if (of_seed := [o for o in outcomes if (o.policy, o.rate, o.seed) == (policy, rate, seed)])
            )
            lines.append(
                f"| {rate}/s | {policy} | {s['within_budget']:.1%} | {s['within_budget_feasible']:.1%} "
                f"({s['feasible']}) | {s['within_budget_roomy']:.1%} ({s['roomy']}) "
                + (f"| {s['within_budget_met_alone']:.1%} ({s['met_alone']}) " if s["met_alone"] else "| - ")
                + f"| {s['mean_quality']:.3f} "
                f"| {s['median_latency_ms']:.0f} | {per_seed} | {served} |"
            )
    lines.append("")
    lines += [f"- {verdict(outcomes, rate)}" for rate in args.rate]
    lines += ["", "Within budget by slack (feasible requests; within budget / requests):", ""]
    lines += by_slack(outcomes, args.rate, args.policies)
    profiles = {v["name"]: {**v["profile"], "margin": v.get("margin")} for v in state.get("variants", [])}
    lines += [
        "",
        "Router profiles after the runs (ms; margin: the factor each variant's budget was divided by): "
        + "; ".join(
            f"{n.replace(names['teacher'], 'T')}: TTFT(128) {p['ttft_ms_128']}, step b1 {p['step_ms_b1']}, "
            f"b8 {p['step_ms_b8']}, margin {p['margin']}"
            for n, p in profiles.items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
