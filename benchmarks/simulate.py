"""Routing and scheduling policies compared on the deterministic simulator (`slimserve.server.simulator`).

    python benchmarks/simulate.py [--variants NAME ... | --profiles FILE] [--rates 0.1 0.3 ...]
                                  [--slo-scales 2 4 ...] [--cvs 1 2] [--count 200] [--seeds 0 1] [--jitter 0.1]
                                  [--backend transformers|vllm]
                                  [--ablate [RULE ...]] [--plots DIR] [--json OUT] [--write FILE]

Each cell of the grid (rate x SLO scale x burstiness) serves the same seeded requests under every policy
(router, always-teacher, always-fastest, random, FCFS) on the variants' cost profiles: their manifests'
measured tables (`slimserve profile`), or, without `--variants`, a demo family of three made-up profiles.
With `--write`, the profiles served on are saved beside the section (`docs/profiles/`) and `--profiles FILE`
serves on them again: manifests are re-profiled as the host drifts, and a section must stay reproducible.
`--backend vllm` serves every variant on a simulated vLLM engine (continuous batching, chunked prefill within
vLLM's token budget, deadlines as priorities: `slimserve.server.sim_vllm`) from its vLLM profile
(`slimserve profile NAME --backend vllm`); its section is written apart from the transformers engine's.
Printed: SLO attainment and mean quality (perplexity ratio to the teacher) per policy and cell, goodput per
policy (the highest rate at which at least 95% of requests met their SLO), and the issue's two checks.
`--ablate` serves the grid again with each scheduling or routing rule switched off (`benchmarks/rules.py`)
and reports what each rule changes. The numbers depend only on the arguments and the profiles: no wall
clock is read, so they are the same on any machine and at any load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from report import heading, machine, publish
from rules import BY_NAME, RULES

from slimserve.server.profile import RUNTIMES, CostProfile
from slimserve.server.simulator import (
    Cell,
    GridConfig,
    Result,
    Variant,
    goodput,
    grid_table,
    load_profiles,
    registered_variants,
    run_grid,
    save_profiles,
)

Key = tuple[float, float, float]
"""(burstiness, SLO scale, rate) of a cell."""


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


def _by_key(cells: Sequence[Cell], policy: str) -> dict[Key, Result]:
    return {(c.cv, c.slo_scale, c.rate): c.result for c in cells if c.policy == policy}


def _goodputs(results: dict[Key, Result]) -> dict[tuple[float, float], float]:
    groups: dict[tuple[float, float], dict[float, Result]] = {}
    for (cv, scale, rate), result in results.items():
        groups.setdefault((cv, scale), {})[rate] = result
    return {group: goodput(by_rate) for group, by_rate in groups.items()}


def checks(cells: Sequence[Cell]) -> list[str]:
    """The two goals: the router's goodput at least always-fastest's with better mean quality at every rate up
    to it; no static policy with both higher attainment (by more than 1 point) and better quality in a cell."""
    router = _by_key(cells, "router")
    lines = []
    if any(c.policy == "fastest" for c in cells):
        fastest = _by_key(cells, "fastest")
        ours, theirs = _goodputs(router), _goodputs(fastest)
        for group in sorted(ours):
            cv, scale = group
            upto = [k for k in router if k[:2] == group and k[2] <= max(ours[group], theirs[group])]
            better = all(router[k].mean_quality < fastest[k].mean_quality for k in upto)
            verdict = "met" if ours[group] >= theirs[group] and better else "not met"
            lines.append(
                f"- cv {cv:g}, SLO x{scale:g}: goodput router {ours[group]:g}/s, fastest {theirs[group]:g}/s; "
                f"router's quality better at every rate up to it: {'yes' if better else 'no'} (**{verdict}**)"
            )
    dominated = []
    for policy in dict.fromkeys(c.policy for c in cells):
        if policy == "router":
            continue
        for key, result in _by_key(cells, policy).items():
            ours_k = router[key]
            if result.attainment > ours_k.attainment + 0.01 and result.mean_quality < ours_k.mean_quality:
                dominated.append(f"{policy} at cv {key[0]:g}, SLO x{key[1]:g}, {key[2]:g}/s")
    lines.append(
        "- no static policy dominates the router in any cell: "
        + ("**met**" if not dominated else f"**not met** ({'; '.join(dominated)})")
    )
    return lines


def ablations(variants: Sequence[Variant], grid: GridConfig, base: Sequence[Cell], names: Sequence[str]) -> list[str]:
    """Per rule: the router's figures with that rule switched off, against the router with every rule on."""
    ours = _by_key(base, "router")
    our_goodput = _goodputs(ours)
    lines = [
        "| rule switched off | what the rule does | attainment change, mean (points) | worst / best cell | "
        "cells worse / better by >1 point | goodput changes | mean quality ratio change |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name in names:
        rule = BY_NAME[name]
        with rule.off():
            cells = run_grid(variants, dataclasses.replace(grid, policies=["router"]))
        off = _by_key(cells, "router")
        deltas = [100 * (off[k].attainment - ours[k].attainment) for k in ours]
        worse, better = sum(d < -1 for d in deltas), sum(d > 1 for d in deltas)
        quality = sum(off[k].mean_quality - ours[k].mean_quality for k in ours) / len(ours)
        changed = [
            f"cv {cv:g} x{scale:g}: {our_goodput[(cv, scale)]:g}->{g:g}"
            for (cv, scale), g in _goodputs(off).items()
            if g != our_goodput[(cv, scale)]
        ]
        lines.append(
            f"| {name} | {rule.what} | {sum(deltas) / len(deltas):+.1f} | {min(deltas):+.1f} / {max(deltas):+.1f} | "
            f"{worse} / {better} | {', '.join(changed) or 'none'} | {quality:+.4f} |"
        )
        print(lines[-1], flush=True)
    return lines


def plot(cells: Sequence[Cell], directory: Path, suffix: str = "") -> list[Path]:
    """SLO attainment and mean quality against rate, one panel per SLO scale, one line per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    directory.mkdir(parents=True, exist_ok=True)
    policies = list(dict.fromkeys(c.policy for c in cells))
    for cv in sorted({c.cv for c in cells}):
        scales = sorted({c.slo_scale for c in cells})
        figure, axes = plt.subplots(2, len(scales), figsize=(4 * len(scales), 6), squeeze=False, sharex=True)
        for column, scale in enumerate(scales):
            for policy in policies:
                mine = [c for c in cells if (c.policy, c.cv, c.slo_scale) == (policy, cv, scale)]
                mine.sort(key=lambda c: c.rate)
                rates = [c.rate for c in mine]
                axes[0][column].plot(rates, [100 * c.result.attainment for c in mine], marker="o", label=policy)
                axes[1][column].plot(rates, [c.result.mean_quality for c in mine], marker="o", label=policy)
            axes[0][column].set_title(f"SLO scale {scale:g}, cv {cv:g}")
            axes[0][column].axhline(95, color="grey", linewidth=0.5)
            axes[1][column].set_xlabel("requests per second")
        axes[0][0].set_ylabel("SLO attainment (%)")
        axes[1][0].set_ylabel("mean perplexity ratio (lower is better)")
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"simulate{suffix}-cv{cv:g}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written


def describe(variants: Sequence[Variant]) -> list[str]:
    lines = ["| variant | ppl ratio | TTFT 128 tok (ms) | step 1 / 8 / 16 rows (ms) |", "|---|---:|---:|---:|"]
    for v in variants:
        steps = " / ".join(f"{v.profile.step_ms(b):.1f}" for b in (1, 8, 16))
        lines.append(f"| {v.name} | {v.ppl_ratio:.3f} | {v.profile.ttft_ms(128):.1f} | {steps} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--variants", nargs="*", default=None, help="registered variants, the teacher first")
    source.add_argument(
        "--profiles", type=Path, default=None, help="serve on profiles a --write run saved (on their engine)"
    )
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5, 0.8])
    parser.add_argument("--slo-scales", nargs="+", type=float, default=[2.0, 3.0, 5.0])
    parser.add_argument("--cvs", nargs="+", type=float, default=[1.0, 2.0], help="burstiness (1: Poisson)")
    parser.add_argument("--count", type=int, default=200, help="requests per cell and seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--jitter", type=float, default=0.1, help="CV of each turn's cost around the profile")
    parser.add_argument(
        "--ablate",
        nargs="*",
        default=None,
        choices=[r.name for r in RULES],
        metavar="RULE",
        help="switch each rule off in turn (no names: every rule) and report what it changes",
    )
    parser.add_argument(
        "--backend",
        choices=RUNTIMES,
        default="transformers",
        help="whose engine serves the variants, on their profiles for it (`slimserve profile NAME --backend vllm`)",
    )
    parser.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every cell's figures here")
    parser.add_argument("--write", type=Path, default=None, help="write the section into this Markdown file")
    args = parser.parse_args()
    backend, measured_on = args.backend, machine() if args.variants else "none: the demo family's are made up"
    try:
        if args.profiles is not None:
            variants, measured_on = load_profiles(args.profiles)
            backend = variants[0].engine  # a saved file's profiles are measured on the engine it names
        else:
            variants = registered_variants(args.variants, args.backend) if args.variants else demo_family()
    except ValueError as exc:
        parser.error(str(exc))
    variants = [dataclasses.replace(v, engine=backend) for v in variants]
    vllm = backend == "vllm"
    grid = GridConfig(args.rates, args.slo_scales, args.cvs, args.count, args.seeds, args.jitter)
    cells = run_grid(variants, grid)
    table = grid_table(variants, cells)
    print("\n".join(table), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([c.figures() for c in cells], indent=1) + "\n")
    where = ", vLLM engines: `make bench-simulate-vllm`" if vllm else ": `make bench-simulate`"
    title = "## Routing on the simulator" + where
    saved = None
    if args.write is not None and args.variants:
        saved = args.write.parent / "profiles" / f"simulate{'-vllm' if vllm else ''}.json"
        save_profiles(variants, measured_on, saved)
    elif args.profiles is not None:
        saved = args.profiles
    lines = heading(title, "benchmarks/simulate.py")
    lines += [
        f"- workload: {grid.count} requests per cell and seed (seeds {' '.join(map(str, grid.seeds))}), Gamma "
        "arrivals (cv 1: Poisson), prompts 16-256 and outputs 16-128 tokens (uniform), each budget the SLO scale "
        "times the request's best unloaded latency; each turn's cost the profile's figure times log-normal "
        f"noise of CV {grid.jitter:g}, which the engines' live profiles learn from, as in the server.",
        "- policies: router (the product); teacher (always the best quality); fastest (the variant fastest "
        "alone for the request); random; fcfs (fastest, no deadlines: first-come-first-served admission and "
        "whole-batch steps). Cells: SLO attainment, then mean perplexity ratio to the teacher (q).",
        *(
            [
                "- engines: vLLM's (simulated): every running row decodes each step, waiting prompts are admitted "
                "by deadline into the same step and chunked within vLLM's token budget; one step at a time on "
                "the host, round robin among the engines. The router plans them so (`round_robin_plan`): a "
                "token waits for one step of every busy engine, so an engine woken slows every running row."
            ]
            if vllm
            else []
        ),
        "- deterministic: the same command gives the same figures on any machine; only the profiles are "
        f"measured (`slimserve profile{' --backend vllm' if vllm else ''}`); where: {measured_on}.",
        *(
            [f"- profiles: saved in `{saved}`; `--profiles {saved}` in place of `--variants` serves on them again"]
            if saved
            else []
        ),
        "",
        *describe(variants),
        "",
        *table[1:],
        "",
        *checks(cells),
    ]
    if args.plots is not None:
        paths = plot(cells, args.plots, "-vllm" if vllm else "")
        target = args.write.parent if args.write else Path.cwd()
        lines += ["", *(f"![{p.stem}]({os.path.relpath(p, target)})" for p in paths)]
    if args.ablate is not None:
        names = args.ablate or [r.name for r in RULES]
        lines += [
            "",
            "Each rule switched off in turn, the router's figures against the router with every rule on, over "
            "the same grid (`--ablate`):",
            "",
            *ablations(variants, grid, cells, names),
        ]
    publish("\n".join(lines), args.write, "simulate-vllm" if vllm else "simulate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
