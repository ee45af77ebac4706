"""How fast the cores were in each phase of a routing benchmark, from its `--dump` and `--trace-turns`.

    python benchmarks/tools/router_drift.py DUMP.jsonl TURNS.jsonl [--variant smollm2-135m-student-int4]

A routing run goes through phases: the unloaded line, each seed's alone replay, then each policy's replay.
For each phase this lists its length, the share of it the compute thread was busy, and the median time of
one variant's decode steps of one and of two rows (turns without a prefill). The same step of the
same model on the same cores should take the same time in every phase; where it does not, the budgets at
stake (within about 1.5x of the unloaded line) are met or missed by the phase the host was in, not by the
policy.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any


@dataclass
class Phase:
    name: str
    start: float
    end: float
    steps: dict[int, list[float]] = field(default_factory=dict)
    """Rows stepped (rows stepped apart from a batch count as their own) -> seconds of each of the variant's
    turns without a prefill."""
    busy_s: float = 0.0


def phases(dump: list[dict[str, Any]]) -> list[Phase]:
    """Consecutive requests of one (policy, seed) form a phase; the dump lists them in the order they ran."""
    found: list[Phase] = []
    for row in dump:
        name = row["policy"] if row.get("seed") is None else f"{row['policy']} seed {row['seed']}"
        start = row["start_pc"]
        end = start + row["ms"] / 1000
        if found and found[-1].name == name:
            found[-1].end = max(found[-1].end, end)
        else:
            found.append(Phase(name, start, end))
    return found


def measure(found: list[Phase], turns: list[dict[str, Any]], variant: str) -> None:
    """Charge each compute turn to the phase it ran in (turns between phases are left out)."""
    for turn in turns:
        phase = next((p for p in found if p.start <= turn["at"] <= p.end), None)
        if phase is None:
            continue
        phase.busy_s += turn["s"]
        stepped = len(turn.get("rows", []))
        if turn["engine"] == variant and not turn["prefills"] and stepped in (1, 2):
            phase.steps.setdefault(stepped, []).append(turn["s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", type=Path)
    parser.add_argument("turns", type=Path)
    parser.add_argument("--variant", default="smollm2-135m-student-int4")
    args = parser.parse_args()
    dump = [json.loads(line) for line in args.dump.read_text().splitlines() if line.strip()]
    turns = [json.loads(line) for line in args.turns.read_text().splitlines() if line.strip()]
    found = phases(dump)
    measure(found, turns, args.variant)
    print(f"{args.variant}: decode steps per phase\n")
    print("| phase | length s | compute busy | 1 row: steps, median ms | 2 rows: steps, median ms |")
    print("|---|---:|---:|---:|---:|")
    for phase in found:
        cells = []
        for rows in (1, 2):
            steps = phase.steps.get(rows, [])
            cells.append(f"{len(steps)}, {1000 * median(steps):.1f}" if steps else "-")
        length = phase.end - phase.start
        print(f"| {phase.name} | {length:.0f} | {phase.busy_s / max(length, 1e-9):.0%} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
