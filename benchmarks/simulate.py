"""Routing and scheduling policies compared on the deterministic simulator (`slimserve.server.simulator`).

    python benchmarks/simulate.py [--variants NAME ...] [--rates 0.1 0.3 ...] [--slo-scales 2 4 ...]
                                  [--cvs 1 2] [--count 200] [--seeds 0 1] [--json OUT]

Each cell of the grid (rate x SLO scale x burstiness) serves the same seeded requests under every policy
(router, always-teacher, always-fastest, random, FCFS) on the variants' cost profiles: their manifests'
measured figures (`slimserve eval`), or, without `--variants`, a demo family of three made-up profiles.
Printed: SLO attainment and mean quality (perplexity ratio to the teacher) per policy and cell, and
goodput per policy (the highest rate at which at least 95% of requests met their SLO). The numbers depend
only on the arguments: no wall clock is read, so they are the same on any machine and at any load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimserve.server.profile import CostProfile
from slimserve.server.simulator import POLICIES, Result, Variant, Workload, goodput, simulate


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


def registered(names: list[str]) -> list[Variant]:
    """The named variants' profiles from their manifests; quality from their perplexity against the first
    (the teacher)."""
    from slimserve.models import VariantRegistry

    manifests = [VariantRegistry().resolve(name).manifest for name in names]
    reference = manifests[0].metrics.get("perplexity")
    variants = []
    for manifest in manifests:
        ppl = manifest.metrics.get("perplexity")
        ratio = float(ppl) / float(reference) if ppl and reference else 1.0
        variants.append(Variant(manifest.name, CostProfile.from_manifest(manifest), ratio))
    return variants


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
    variants = registered(args.variants) if args.variants else demo_family()
    cells = []
    print(f"variants: {', '.join(f'{v.name} (ppl x{v.ppl_ratio:.3f})' for v in variants)}")
    print("| cv | SLO scale | rate/s | " + " | ".join(POLICIES) + " |")
    print("|---" * (3 + len(POLICIES)) + "|")
    by_policy: dict[tuple[str, float, float], dict[float, Result]] = {}
    for cv in args.cvs:
        for scale in args.slo_scales:
            for rate in args.rates:
                row = []
                for policy in POLICIES:
                    results = [
                        simulate(variants, Workload(rate, args.count, cv, scale, seed=seed), policy)
                        for seed in args.seeds
                    ]
                    merged = Result(
                        policy,
                        sum(r.requests for r in results),
                        sum(r.met for r in results),
                        sum(r.mean_quality for r in results) / len(results),
                        [ms for r in results for ms in r.latencies_ms],
                    )
                    by_policy.setdefault((policy, cv, scale), {})[rate] = merged
                    row.append(f"{merged.attainment:.1%} q{merged.mean_quality:.3f}")
                    cells.append(
                        {
                            "policy": policy,
                            "cv": cv,
                            "slo_scale": scale,
                            "rate": rate,
                            "attainment": merged.attainment,
                            "mean_quality": merged.mean_quality,
                            "p50_ms": merged.percentile_ms(0.5),
                            "p90_ms": merged.percentile_ms(0.9),
                        }
                    )
                print(f"| {cv:g} | {scale:g} | {rate:g} | " + " | ".join(row) + " |")
    print("\ngoodput at 95% attainment (requests/s; 0: not even the lowest rate)")
    for (policy, cv, scale), results in by_policy.items():
        print(f"  {policy:>8}  cv {cv:g}  SLO x{scale:g}: {goodput(results):g}")
    if args.json is not None:
        args.json.write_text(json.dumps(cells, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
