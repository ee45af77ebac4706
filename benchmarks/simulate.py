"""Routing and scheduling policies compared on the deterministic simulator (`slimserve.server.simulator`).

    python benchmarks/simulate.py [--variants NAME ...] [--rates 0.1 0.3 ...] [--slo-scales 2 4 ...]
                                  [--cvs 1 2] [--count 200] [--seeds 0 1] [--json OUT]

Each cell of the grid (rate x SLO scale x burstiness) serves the same seeded requests under every policy
(router, always-teacher, always-fastest, random, FCFS) on the variants' cost profiles: their manifests'
measured figures (`slimserve profile`), or, without `--variants`, a demo family of three made-up profiles.
Printed: SLO attainment and mean quality (perplexity ratio to the teacher) per policy and cell, and
goodput per policy (the highest rate at which at least 95% of requests met their SLO). The numbers depend
only on the arguments: no wall clock is read, so they are the same on any machine and at any load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimserve.server.profile import CostProfile
from slimserve.server.simulator import GridConfig, Variant, grid_table, registered_variants, run_grid


def demo_family() -> list[Variant]:
    """Three made-up profiles in the proportions of a teacher and its 8-bit and 4-bit variants on a CPU."""

    def variant(name: str, step_ms: float, ppl_ratio: float) -> Variant:
        profile = CostProfile(
            prefill_overhead_ms=20,
            prefill_per_token_ms=step_ms / 25,
            step_b1_ms=step_ms,
            step_b8_ms=2.5 * step_ms,
            load_ms=0,
        )
        return Variant(name, profile, ppl_ratio)

    return [variant("teacher", 80, 1.0), variant("int8", 45, 1.01), variant("int4", 30, 1.09)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=None, help="registered variants, the teacher first")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.8])
    parser.add_argument("--slo-scales", nargs="+", type=float, default=[2.0, 3.0, 5.0])
    parser.add_argument("--cvs", nargs="+", type=float, default=[1.0, 2.0], help="burstiness (1: Poisson)")
    parser.add_argument("--count", type=int, default=200, help="requests per cell and seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--json", type=Path, default=None, help="also write every cell's figures here")
    args = parser.parse_args()
    variants = registered_variants(args.variants) if args.variants else demo_family()
    grid = GridConfig(args.rates, args.slo_scales, args.cvs, args.count, args.seeds)
    cells = run_grid(variants, grid)
    print("\n".join(grid_table(variants, cells)))
    if args.json is not None:
        args.json.write_text(json.dumps([c.figures() for c in cells], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
