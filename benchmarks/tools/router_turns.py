"""Where each request's time went, from a routing benchmark's `--dump` and its server's `--trace-turns`.

    python benchmarks/tools/router_turns.py DUMP.jsonl TURNS.jsonl [--policy router] [--all]

Every compute turn the server ran while a request was in flight is charged to one of: its own prefill, its
own decode steps, other requests' prefills, other requests' decode steps (on its engine's batch or another
engine's), or nothing on the compute thread (the event loop, HTTP, tokenizing: the gaps between turns).
A request is found in the trace by the sequence ids its response named (`X-Slimserve-Sequences`); both
clocks are `time.perf_counter()` of the same machine.

Lists the requests that missed their budget (`--all`: every request of the policy) with the simulator's
latency for each, then the median share of each part over the requests met and missed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

PARTS = (
    "wait: prefills",
    "wait: steps",
    "own prefill",
    "own steps",
    "other prefills",
    "steps, same variant",
    "steps, other variants",
    "off thread",
)
"""Before its prefill, other requests' prefills and steps; its own prefill (all its chunks) and steps; then
other requests' prefills, steps of its own variant's rows without it (rows stepped apart, or it waiting),
and other variants' steps; the rest is time no compute turn ran."""


@dataclass
class Spent:
    """Milliseconds of one request's latency, by what the compute thread was doing."""

    total_ms: float
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    own_steps: int = 0
    apart_steps: int = 0
    """Own steps that ran apart from the rest of its batch (`Scheduler.schedule_decode`)."""
    biggest_other_ms: float = 0.0
    """The longest single turn of other work while it was in flight (a prefill cannot be interrupted)."""


def charge(row: dict[str, Any], turns: list[dict[str, Any]]) -> Spent:
    """Split the request's interval [sent, sent + latency] over the turns that overlap it."""
    start = float(row["start_pc"])
    end = start + float(row["ms"]) / 1000
    own = set((row.get("sequences") or "").split(","))
    spent = Spent(total_ms=float(row["ms"]))
    prefilled = False
    busy = 0.0
    for turn in turns:
        began, took = float(turn["at"]), float(turn["s"])
        overlap = min(end, began + took) - max(start, began)
        if overlap <= 0:
            continue
        busy += overlap
        mine_prefill = any(p["id"] in own for p in turn.get("prefills", []))
        mine_step = bool(own.intersection(turn.get("rows", [])))
        if mine_prefill or mine_step:  # a turn that prefills it and steps others: charged to its prefill
            part = "own prefill" if mine_prefill else "own steps"
            spent.own_steps += mine_step
            spent.apart_steps += mine_step and bool(turn.get("apart"))
            prefilled = True
        elif not prefilled:
            part = "wait: prefills" if turn.get("prefills") else "wait: steps"
        elif turn.get("prefills"):
            part = "other prefills"
        else:
            part = "steps, same variant" if turn["engine"] == row["variant"] else "steps, other variants"
        if not (mine_prefill or mine_step):
            spent.biggest_other_ms = max(spent.biggest_other_ms, 1000 * overlap)
        spent.parts[part] += 1000 * overlap
    spent.parts["off thread"] = max(0.0, spent.total_ms - 1000 * busy)
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", type=Path)
    parser.add_argument("turns", type=Path)
    parser.add_argument("--policy", default="router")
    parser.add_argument("--all", action="store_true", help="list every request of the policy, not only misses")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.dump.read_text().splitlines() if line.strip()]
    turns = sorted(
        (json.loads(line) for line in args.turns.read_text().splitlines() if line.strip()), key=lambda t: t["at"]
    )
    chosen = [r for r in rows if r.get("policy") == args.policy and r.get("sequences")]
    if not chosen:
        print(f"no {args.policy} requests with sequence ids in {args.dump} (a dump from before --trace-turns?)")
        return 2
    header = "| seed | rate | at s | simulated ms | tokens | variant | budget ms | took ms | " + " | ".join(PARTS)
    print(header + " | own steps (apart) | longest other turn ms |")
    print("|" + "---:|" * (len(PARTS) + 10))
    met: dict[bool, list[Spent]] = {True: [], False: []}
    for row in sorted(chosen, key=lambda r: (r["seed"], r["rate"], r["at"])):
        spent = charge(row, turns)
        within = row["ms"] <= row["budget_ms"]
        met[within].append(spent)
        if within and not args.all:
            continue
        parts = " | ".join(f"{spent.parts[p]:.0f}" for p in PARTS)
        print(
            f"| {row['seed']} | {row['rate']} | {row['at']} | {row.get('sim_ms')} | "
            f"{row['prompt_tokens']}+{row['max_tokens']} | "
            f"{row['variant']} | {row['budget_ms']} | {row['ms']} | {parts} | {spent.own_steps} ({spent.apart_steps}) "
            f"| {spent.biggest_other_ms:.0f} |"
        )
    print()
    print("| within budget | requests | " + " | ".join(f"{p} (median share)" for p in PARTS) + " |")
    print("|---|" + "---:|" * (len(PARTS) + 1))
    for within in (True, False):
        group = met[within]
        if not group:
            continue
        shares = " | ".join(f"{median(g.parts[p] / g.total_ms for g in group):.1%}" for p in PARTS)
        print(f"| {'met' if within else 'missed'} | {len(group)} | {shares} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
