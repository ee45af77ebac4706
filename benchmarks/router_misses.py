"""Where a routing benchmark's misses are, from its `--dump`: within budget per slack bin and policy.

    python benchmarks/router_misses.py DUMP.jsonl

Slack is recomputed as the benchmark does (budget / the least unloaded latency of any variant for the
request's prompt length and max_tokens), from the dump's unloaded measurements (`policy: "unloaded"`:
per variant a warm-up, a short and a long one-token prompt, then 64 tokens).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from router_bench import Alone, Outcome, by_slack


def alone_from_dump(rows: list[dict[str, Any]]) -> dict[str, Alone]:
    timings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("policy") == "unloaded":
            timings[row["variant"]].append(row)
    alone = {}
    for variant, (_, short, long, many) in ((v, t[:4]) for v, t in timings.items() if len(t) >= 4):
        alone[variant] = Alone.from_timings(
            (short["ms"], short["prompt_tokens"]), (long["ms"], long["prompt_tokens"]), many["ms"]
        )
    return alone


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    alone = alone_from_dump(rows)
    if not alone:
        print("no unloaded measurements in the dump (written by an older router_bench?)", file=sys.stderr)
        return 2
    outcomes = []
    for row in rows:
        if row.get("policy") in (None, "unloaded") or not row.get("budget_ms"):
            continue
        best = min(a.latency_ms(row["prompt_tokens"], row["max_tokens"]) for a in alone.values())
        outcomes.append(
            Outcome(
                row["rate"],
                row["policy"],
                row["variant"],
                row["ms"],
                row["budget_ms"],
                0.0,
                row["budget_ms"] / best,
                row["seed"],
            )
        )
    rates = sorted({o.rate for o in outcomes})
    policies = list(dict.fromkeys(o.policy for o in outcomes))
    print("\n".join(by_slack(outcomes, rates, policies)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
