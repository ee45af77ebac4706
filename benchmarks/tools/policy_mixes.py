"""Static policies beyond the simulator's own, on one group of its grid: each variant alone, and threshold
mixes (the teacher unless its unloaded latency times 1 + alpha exceeds the request's budget, else the
variant fastest alone for it). What bounds a goal the router misses: if no static mix reaches it, the
router's plans are not what stands in the way.

    python benchmarks/tools/policy_mixes.py PROFILES --cv 2 --slo-scale 2 --rates 0.5 1 1.5 \\
        [--alphas 0 0.2 0.4 0.5 0.55 0.6] [--seeds 0 1]

PROFILES is a file `benchmarks/simulate.py --write` saved (docs/profiles/simulate-vllm.json). Per policy
and rate: SLO attainment and mean perplexity ratio, averaged over the seeds. The mixes are patched in for
the length of the run (`simulator._chooser`, as `benchmarks/rules.py` patches rules off), so the product
keeps its one set of policies.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from slimserve.server import simulator
from slimserve.server.predictions import alone_ms
from slimserve.server.sim_engine import SimEngine

Chooser = Callable[[simulator.Arrival], tuple[SimEngine, None]]


def only(index: int) -> Callable[..., Chooser]:
    """Every request to the family's `index`-th variant."""

    def chooser(policy: str, engines: list[SimEngine], router: object, rng: random.Random) -> Chooser:
        return lambda arrival: (engines[index], None)

    return chooser


SIMULATORS_CHOOSER = simulator._chooser
"""The simulator's own policies, before a mix is patched in: the mixes choose between its teacher and fastest."""


def threshold(alpha: float) -> Callable[..., Chooser]:
    """The teacher (the best quality) unless its unloaded latency times 1 + `alpha` exceeds the budget, then
    the variant fastest alone for the request: the simulator's `teacher` and `fastest` policies."""

    def chooser(policy: str, engines: list[SimEngine], router: Any, rng: random.Random) -> Chooser:
        teacher = SIMULATORS_CHOOSER("teacher", engines, router, rng)
        fastest = SIMULATORS_CHOOSER("fastest", engines, router, rng)

        def choose(arrival: simulator.Arrival) -> tuple[SimEngine, None]:
            best, _ = teacher(arrival)
            tight = alone_ms(best, arrival.prompt_tokens, arrival.output_tokens) * (1 + alpha) > arrival.budget_ms
            return (fastest(arrival)[0] if tight else best), None

        return choose

    return chooser


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profiles", type=Path)
    parser.add_argument("--cv", type=float, default=2.0)
    parser.add_argument("--slo-scale", type=float, default=2.0)
    parser.add_argument("--rates", nargs="+", type=float, default=[0.5, 1.0, 1.5])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.2, 0.4, 0.5, 0.55, 0.6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    args = parser.parse_args()

    variants, _ = simulator.load_profiles(args.profiles)
    policies = [(f"only {v.name}", only(i)) for i, v in enumerate(variants)]
    policies += [(f"teacher unless alone x {1 + a:g} > budget", threshold(a)) for a in args.alphas]
    print(f"cv {args.cv:g}, SLO x{args.slo_scale:g}, seeds {' '.join(map(str, args.seeds))}: attainment q(ppl ratio)")
    print("| policy | " + " | ".join(f"{r:g}/s" for r in args.rates) + " |")
    print("|---|" + "---:|" * len(args.rates))
    for name, chooser in policies:
        cells = []
        with mock.patch.object(simulator, "_chooser", chooser):
            for rate in args.rates:
                results = [
                    simulator.simulate(
                        variants,
                        simulator.Workload(rate, cv=args.cv, slo_scale=args.slo_scale, seed=seed),
                        "teacher",
                    )
                    for seed in args.seeds
                ]
                attained = sum(r.attainment for r in results) / len(results)
                quality = sum(r.mean_quality for r in results) / len(results)
                cells.append(f"{100 * attained:.1f}% q{quality:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
