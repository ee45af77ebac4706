"""What scheduling alone could reach on a routing run's workload: replay it offline on one variant's costs.

    python benchmarks/tools/router_replay.py DUMP [--variant NAME] [--policy smallest] [--safety 1.25]

DUMP is the `--dump` file of `router_bench.py`: every request's arrival, prompt and output tokens and budget,
and the unloaded timings of each variant taken before the runs. The replay serves one policy's requests (the
same arrivals every policy saw) on a model of one variant: prefill = base + per prompt token and a batch-1
step, both from those unloaded timings, and a step of B rows interpolated to the variant's batch-8 step (its
manifest's `decode_tok_s_b8`). Nothing else runs: no event loop, no HTTP, no other variant. Schedulers:

  fcfs      every arrival is prefilled at once, then the whole batch steps (the engine before b6c59bf)
  edf       earliest deadline first among requests that can still make it: its prefill or the whole batch
  edf-apart as edf, but rows whose deadline the whole batch's steps would miss step alone (the engine now)

A request is feasible as in `router_bench.py`: some variant alone meets its budget. The replay's share for
fcfs is a check of the model against the run's measured always-smallest figure, which it prints beside it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router_misses import alone_from_dump

from slimserve.models import VariantRegistry
from slimserve.server.scheduler import savable as can_still_make


@dataclass
class Costs:
    prefill_base_ms: float
    prefill_per_token_ms: float
    step_b1_ms: float
    step_b8_ms: float

    def prefill(self, prompt_tokens: int) -> float:
        return self.prefill_base_ms + self.prefill_per_token_ms * prompt_tokens

    def step(self, rows: int) -> float:
        if rows <= 8:
            return self.step_b1_ms + (self.step_b8_ms - self.step_b1_ms) * (rows - 1) / 7
        return self.step_b8_ms * rows / 8


@dataclass(eq=False)
class Request:
    arrival_ms: float
    due_ms: float
    prompt_tokens: int
    left: int
    prefilled: bool = False
    finished_ms: float | None = None


def savable(request: Request, now: float, costs: Costs) -> bool:
    """Its work left, alone at batch 1 from `now`, still ends by its deadline (the scheduler's test)."""
    if request.prefilled:
        return can_still_make(request.due_ms - now, request.left, costs.step_b1_ms)
    first = costs.prefill(request.prompt_tokens)
    return can_still_make(request.due_ms - now, request.left - 1, costs.step_b1_ms, first)


def replay(jobs: list[dict[str, Any]], costs: Costs, scheduler: str, safety: float) -> list[Request]:
    requests = [
        Request(j["at"] * 1000, j["at"] * 1000 + j["budget_ms"], j["prompt_tokens"], j["max_tokens"]) for j in jobs
    ]
    pending = sorted(requests, key=lambda r: r.arrival_ms)
    now, arrived, waiting, running = 0.0, 0, [], []
    while arrived < len(pending) or waiting or running:
        while arrived < len(pending) and pending[arrived].arrival_ms <= now:
            waiting.append(pending[arrived])
            arrived += 1
        if not waiting and not running:
            now = pending[arrived].arrival_ms
            continue

        first = None
        if scheduler != "fcfs":
            hopeful = sorted((r for r in waiting + running if savable(r, now, costs)), key=lambda r: r.due_ms)
            first = hopeful[0] if hopeful else None
        if (first is None and waiting) or (first is not None and not first.prefilled):
            request = first if first is not None else waiting[0]
            waiting.remove(request)
            now += costs.prefill(request.prompt_tokens)
            request.prefilled, request.left = True, request.left - 1
            running.append(request)
        else:
            group = running
            if scheduler == "edf-apart":
                full = costs.step(len(running))
                urgent = [r for r in running if savable(r, now, costs) and now + r.left * full * safety > r.due_ms]
                group = urgent or running
            now += costs.step(len(group))
            for request in group:
                request.left -= 1
        for request in [r for r in running if r.left <= 0]:
            running.remove(request)
            request.finished_ms = now
    return requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", type=Path)
    parser.add_argument("--variant", default=None, help="variant to model (default: what --policy served)")
    parser.add_argument("--policy", default="smallest", help="whose requests to replay (all saw the same arrivals)")
    parser.add_argument("--safety", type=float, default=1.25, help="edf-apart: steps planned at this multiple")
    parser.add_argument("--rate", type=float, default=None, help="only the requests of this arrival rate")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.dump.read_text().splitlines() if line.strip()]
    alone = alone_from_dump(rows)
    jobs = [
        r
        for r in rows
        if r["policy"] == args.policy and r.get("budget_ms") and (args.rate is None or r.get("rate") == args.rate)
    ]
    if not jobs:
        print(f"no requests of policy {args.policy!r} with a budget in {args.dump}")
        return 2
    name = args.variant or max({j["variant"] for j in jobs}, key=lambda v: sum(j["variant"] == v for j in jobs))
    if name not in alone:
        print(f"no unloaded timings of {name!r} in {args.dump} (have: {', '.join(sorted(alone))})")
        return 2
    b8_tok_s = VariantRegistry().resolve(name).manifest.metrics.get("decode_tok_s_b8")
    if not b8_tok_s:
        print(f"{name} has no measured decode_tok_s_b8 in its manifest (run slimserve eval)")
        return 2
    model = alone[name]
    base, per_token = model.ttft_base_ms, model.ttft_per_prompt_token_ms
    costs = Costs(base, per_token, model.per_token_ms, 8 * 1000 / float(b8_tok_s))

    def best_alone_ms(job: dict[str, Any]) -> float:
        return min(a.latency_ms(job["prompt_tokens"], job["max_tokens"]) for a in alone.values())

    feasible = [j["budget_ms"] >= best_alone_ms(j) for j in jobs]
    measured = sum(f and j["ms"] <= j["budget_ms"] for f, j in zip(feasible, jobs, strict=True))
    print(
        f"model of {name}: prefill {base:.0f} ms + {per_token:.2f} ms/token, step {costs.step_b1_ms:.1f} ms at 1 "
        f"row, {costs.step_b8_ms:.1f} at 8; {len(jobs)} requests of policy {args.policy!r}, {sum(feasible)} feasible"
    )
    print(f"  measured in the run ({args.policy}): {measured}/{sum(feasible)} feasible budgets met")
    for scheduler in ("fcfs", "edf", "edf-apart"):
        met = 0
        for rate, seed in sorted({(j.get("rate"), j.get("seed", 0)) for j in jobs}):
            part = [
                (j, f) for j, f in zip(jobs, feasible, strict=True) if (j.get("rate"), j.get("seed", 0)) == (rate, seed)
            ]
            done = replay([j for j, _ in part], costs, scheduler, args.safety)
            met += sum(
                f and r.finished_ms is not None and r.finished_ms <= r.due_ms
                for (_, f), r in zip(part, done, strict=True)
            )
        share = met / max(sum(feasible), 1)
        print(f"  replayed, {scheduler:>9}: {met}/{sum(feasible)} = {share:.1%} of feasible budgets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
