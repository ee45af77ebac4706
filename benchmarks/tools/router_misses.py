"""Where a routing benchmark's misses are, from its `--dump`: within budget per slack bin and policy.

    python benchmarks/tools/router_misses.py DUMP.jsonl [--list]

`--list` adds every feasible request the router missed: its slack, tokens, budget, the variant it went to,
the router's prediction, verdict and rule (dumps since the `X-Slimserve-Route-Reason` header), what it took,
and what each other policy took for the same request.

A second table splits each policy's requests into those that ran alone (no other request of the replay in
flight at any moment of theirs) and those that overlapped one: alone, a request's latency over the unloaded
prediction for its variant measures how far the machine drifted from when it was measured, and what is
missed alone no policy could have met.

Slack is recomputed as the benchmark does (budget / the least unloaded latency of any variant for the
request's prompt length and max_tokens), from the dump's unloaded measurements (`policy: "unloaded"`:
per variant and round a warm-up, a short and a long one-token prompt, then 64 tokens; the median of the
rounds).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # router_bench.py, the benchmark whose dumps this reads
from router_bench import Alone, Outcome, by_slack


def alone_from_dump(rows: list[dict[str, Any]]) -> dict[str, Alone]:
    timings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("policy") == "unloaded":
            timings[row["variant"]].append(row)
    alone = {}
    for variant, rows_of in timings.items():  # rounds of four: warm-up, short, long, short run to 64 tokens
        rounds = [
            Alone.from_timings((short["ms"], short["prompt_tokens"]), (long["ms"], long["prompt_tokens"]), many["ms"])
            for _, short, long, many in (rows_of[i : i + 4] for i in range(0, len(rows_of) - 3, 4))
        ]
        if rounds:
            alone[variant] = Alone.median_of(rounds)
    return alone


def slack(row: dict[str, Any], alone: dict[str, Alone]) -> float:
    """A request's budget over the least unloaded latency of any variant for its lengths."""
    return float(row["budget_ms"]) / min(a.latency_ms(row["prompt_tokens"], row["max_tokens"]) for a in alone.values())


def main() -> int:
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--list"):
        print(__doc__, file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    alone = alone_from_dump(rows)
    if not alone:
        print("no unloaded measurements in the dump (written by an older router_bench?)", file=sys.stderr)
        return 2
    outcomes = []
    rates = sorted({row["rate"] for row in rows if row.get("policy") not in (None, "unloaded", "alone")})
    for row in rows:
        if row.get("policy") in (None, "unloaded") or not row.get("budget_ms"):
            continue
        # the one-at-a-time replay (`--alone`) has no rate: it stands beside every rate's policies
        for rate in rates if row["policy"] == "alone" else [row["rate"]]:
            outcomes.append(
                Outcome(
                    rate,
                    row["policy"],
                    row["variant"],
                    row["ms"],
                    row["budget_ms"],
                    0.0,
                    slack(row, alone),
                    row["seed"],
                )
            )
    policies = list(dict.fromkeys(o.policy for o in outcomes))
    print("\n".join(by_slack(outcomes, rates, policies)))
    print("\n".join(alone_or_overlapped(rows, alone)))
    if len(sys.argv) == 3:
        print("\n".join(router_misses(rows, alone)))
    return 0


def alone_or_overlapped(rows: list[dict[str, Any]], alone: dict[str, Alone]) -> list[str]:
    """Per policy: requests that ran with nothing else in flight against those that overlapped another."""
    lines = [
        "",
        "| policy | ran | requests | feasible within budget | median took / unloaded prediction (own variant) |",
        "|---|---|---:|---:|---:|",
    ]
    replays: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("policy") not in (None, "unloaded") and row.get("budget_ms") and row["variant"] in alone:
            replays[(row["policy"], row["rate"], row["seed"])].append(row)
    for policy in dict.fromkeys(key[0] for key in replays):
        groups: dict[str, list[dict[str, Any]]] = {"alone": [], "overlapped": []}
        for key, replay in replays.items():
            if key[0] != policy:
                continue
            spans = [(r["start_pc"], r["start_pc"] + r["ms"] / 1000) for r in replay]
            for row, (start, end) in zip(replay, spans, strict=True):
                # itself counts once; 10 ms of slack for the dump's rounding (one-at-a-time requests abut)
                overlaps = sum(s < end - 0.01 and e > start + 0.01 for s, e in spans) > 1
                groups["overlapped" if overlaps else "alone"].append(row)
        for ran, group in groups.items():
            if not group:
                continue
            feasible = [r for r in group if slack(r, alone) >= 1]
            met = sum(r["ms"] <= r["budget_ms"] for r in feasible)
            drift = median(r["ms"] / alone[r["variant"]].latency_ms(r["prompt_tokens"], r["max_tokens"]) for r in group)
            lines.append(f"| {policy} | {ran} | {len(group)} | {met}/{len(feasible)} | {drift:.2f} |")
    return lines


def request_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """The same request across replays (its arrival time differs with the rate; the alone replay has none)."""
    return (row["seed"], row["prompt_tokens"], row["max_tokens"], row["budget_ms"])


def router_misses(rows: list[dict[str, Any]], alone: dict[str, Alone]) -> list[str]:
    """One line per feasible request the router missed, with the other policies' latency for it."""
    same: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:  # keyed by what the request is, not its arrival alone: two can arrive in one 10 ms
        if row.get("policy") not in (None, "unloaded", "alone") and row.get("budget_ms"):
            same[(row["rate"], row["seed"], row["at"], *request_key(row)[1:])][row["policy"]] = row
    met_alone = {request_key(row): row for row in rows if row.get("policy") == "alone"}
    lines = [
        "",
        "| rate | seed | at s | slack | prompt / max tokens | budget ms | variant | predicted ms | took ms | others "
        "| rule |",
    ]
    lines.append("|---:|---:|---:|---:|---|---:|---|---:|---:|---|---|")
    for (rate, seed, at, *_), by_policy in sorted(same.items()):
        row = by_policy.get("router")
        if row is None or row["ms"] <= row["budget_ms"]:
            continue
        if slack(row, alone) < 1:
            continue
        others = ", ".join(
            f"{policy} {other['ms']}{'' if other['ms'] <= other['budget_ms'] else ' (missed)'}"
            for policy, other in [*by_policy.items(), ("alone", met_alone.get(request_key(row)))]
            if policy != "router" and other is not None
        )
        lines.append(
            f"| {rate} | {seed} | {at} | {slack(row, alone):.2f} | {row['prompt_tokens']} / {row['max_tokens']} "
            f"| {row['budget_ms']} | {row['variant']} | {row['predicted_ms']} ({row['routing']}) | {row['ms']} "
            f"| {others} | {row.get('reason') or '-'} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
