"""The simulator's fidelity, checked live: a workload of the simulator replayed through the real server with
`model: auto`, each request's latency compared with what the simulator predicts for it.

    python benchmarks/router_bench.py [--variants NAME ...] [--rates 0.1 0.3] [--slo-scale 3] [--cv 1]
                                      [--count 40] [--seed 0] [--jitter 0.1] [--dump FILE] [--write FILE]

The variants are registered ones, the teacher first; the server serves them all. Each is profiled again
first (`slimserve profile`, into its manifest; `--no-profile` keeps the recorded one), so the simulator's
costs come from the same phase of the host as the live run: this host drifts 10-30% between phases.
Per rate, the simulator's seeded workload (`slimserve.server.simulator.arrivals`:
Gamma arrivals, prompt and output lengths, budgets an SLO scale times each request's best unloaded
latency) is sent as completions requests: the prompt as exactly that many token ids of held-out text,
`max_tokens` the output length with `ignore_eos` (every request does exactly the work simulated), the
budget in `X-Latency-Budget-Ms`. The same workload runs on the simulator under the router on the same
profiles. Reported per rate: the median absolute error of simulated against live latency (relative to
live), the share of requests both sent to the same variant, and SLO attainment both ways. The workload
is also simulated once more at the speed the host ran the server's decode turns in each few seconds of
the replay (`host_speed`, from the server's `--trace-turns`): what is left between that and live is the
simulator's own error, and the rest the host's phases, which no profile foresees. The simulator is
trusted as far as this agreement goes; the policies themselves are compared there (`make bench-simulate`),
not here, because live runs on shared cores drift more than most rules matter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from openai import AsyncOpenAI
from report import heading, publish
from serve_bench import free_port, stop, wait_healthy

from slimserve.compression.data import eval_text
from slimserve.models import VariantRegistry
from slimserve.server.simulator import Arrival, Result, Variant, Workload, arrivals, registered_variants, simulate


@dataclass
class Live:
    variant: str
    ms: float
    start_pc: float
    sequences: str | None
    predicted_ms: str | None
    """The router's prediction for it (`X-Slimserve-Predicted-Ms`), and why it chose (`X-Slimserve-Route-Reason`)."""
    reason: str | None


def held_out_ids(teacher_dir: Path) -> list[int]:
    """The held-out text as the teacher's token ids, which prompts are cut from."""
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(teacher_dir))(eval_text())["input_ids"])


def token_prompts(ids: list[int], requests: list[Arrival], seed: int) -> list[list[int]]:
    """Per request, exactly its prompt length of token ids cut from held-out text at a seeded offset."""
    rng = random.Random(seed)
    prompts = []
    for request in requests:
        start = rng.randrange(0, len(ids) - request.prompt_tokens)
        prompts.append(ids[start : start + request.prompt_tokens])
    return prompts


async def replay(base: str, requests: list[Arrival], prompts: list[list[int]]) -> list[Live]:
    """Send each request at its arrival time (from now); latency from its send to its response."""
    client = AsyncOpenAI(base_url=base, api_key="none", timeout=600, max_retries=0)
    began = time.perf_counter()

    async def one(request: Arrival, prompt: list[int]) -> Live:
        await asyncio.sleep(max(0.0, began + request.at_s - time.perf_counter()))
        started = time.perf_counter()
        raw = await client.completions.with_raw_response.create(
            model="auto",
            prompt=prompt,
            max_tokens=request.output_tokens,
            temperature=0,
            extra_headers={"X-Latency-Budget-Ms": f"{request.budget_ms:.1f}"},
            extra_body={"ignore_eos": True},
        )
        completion = raw.parse()
        ms = 1000 * (time.perf_counter() - started)
        headers = raw.headers
        return Live(
            completion.model,
            ms,
            started,
            headers.get("x-slimserve-sequences"),
            headers.get("x-slimserve-predicted-ms"),
            headers.get("x-slimserve-route-reason"),
        )

    try:
        return await asyncio.gather(*(one(r, p) for r, p in zip(requests, prompts, strict=True)))
    finally:
        await client.close()


WINDOW_S = 5.0
"""Length of the windows the host's speed is measured over (`host_speed`): long enough for dozens of decode
turns, short against the host's phases (slow stretches of 10-30 s)."""


def host_speed(trace: Path, variants: list[Variant], began: float) -> Callable[[float], float]:
    """The host's speed during a replay that began at `began` (`time.perf_counter()`), from the server's turn
    trace: per `WINDOW_S` window of the replay, the median ratio of a decode turn's time (one without a
    prefill) to what the simulator charges it (its variant's profile at its rows). A window without decode
    turns takes the last one before it; before the first, 1."""
    profiles = {v.name: v.profile for v in variants}
    ratios: dict[int, list[float]] = {}
    lines = trace.read_text().splitlines() if trace.exists() else []
    for line in lines:
        turn = json.loads(line)
        if "warm_up" in turn or turn["prefills"] or not turn.get("rows") or turn["engine"] not in profiles:
            continue
        window = int((turn["at"] - began) // WINDOW_S)
        if window >= 0:
            stepped = len(turn["rows"])  # the rows this turn stepped (all, or those stepped apart)
            ratios.setdefault(window, []).append(1000 * turn["s"] / profiles[turn["engine"]].step_ms(stepped))
    speeds = {window: median(values) for window, values in ratios.items()}
    if not speeds:
        print(f"warning: no decode turns of these variants in {trace}: simulated at the profiles' speed", flush=True)

    def speed(at_s: float) -> float:
        earlier = [w for w in speeds if w <= at_s // WINDOW_S]
        return speeds[max(earlier)] if earlier else 1.0

    return speed


@dataclass
class Agreement:
    rate: float
    requests: int
    error: float
    """Median of |simulated - live| / live over the requests."""
    same_variant: float
    live_attainment: float
    sim_attainment: float
    host: Agreement | None = None
    """The same, simulated at the host's measured speed (`host_speed`), where the server traced its turns."""

    def row(self) -> str:
        cells = (
            f"| {self.rate:g} | {self.requests} | {100 * self.error:.1f}% | {100 * self.same_variant:.0f}% | "
            f"{100 * self.live_attainment:.1f}% | {100 * self.sim_attainment:.1f}% | "
            f"{100 * (self.live_attainment - self.sim_attainment):+.1f} |"
        )
        if self.host is None:
            return cells + " | | |"
        host = self.host
        return (
            cells + f" {100 * host.error:.1f}% | {100 * host.sim_attainment:.1f}% | "
            f"{100 * (host.live_attainment - host.sim_attainment):+.1f} |"
        )


def compare(
    rate: float, requests: list[Arrival], live: list[Live], simulated: Result, host: Result | None = None
) -> Agreement:
    errors = [abs(s - row.ms) / row.ms for s, row in zip(simulated.latencies_ms, live, strict=True)]
    return Agreement(
        rate,
        len(requests),
        median(errors),
        sum(row.variant == v for row, v in zip(live, simulated.routed, strict=True)) / len(live),
        sum(row.ms <= r.budget_ms for row, r in zip(live, requests, strict=True)) / len(live),
        sum(ms <= r.budget_ms for ms, r in zip(simulated.latencies_ms, requests, strict=True)) / len(live),
        compare(rate, requests, live, host) if host is not None else None,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["smollm2-135m-instruct", "smollm2-135m-instruct-int8-dynamic", "smollm2-135m-instruct-int4-gptq"],
        help="registered variants with measured profiles, the teacher first",
    )
    parser.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.3], help="requests per second (each)")
    parser.add_argument("--slo-scale", type=float, default=3.0)
    parser.add_argument("--cv", type=float, default=1.0, help="burstiness of arrivals (1: Poisson)")
    parser.add_argument("--count", type=int, default=40, help="requests per rate")
    parser.add_argument("--prompt-tokens", nargs=2, type=int, default=[16, 256], metavar=("LOW", "HIGH"))
    parser.add_argument("--output-tokens", nargs=2, type=int, default=[16, 128], metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter", type=float, default=0.1, help="the simulator's per-turn cost noise (CV)")
    parser.add_argument("--dump", type=Path, default=None, help="every request, live and simulated (JSON lines)")
    parser.add_argument(
        "--trace-turns", type=Path, default=None, help="keep the server's turn trace here (default: a temporary file)"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="simulate on the profiles the manifests hold (by default each variant is profiled first, so the "
        "simulated and the live run meet the host in the same phase)",
    )
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    if args.profile:
        for name in args.variants:
            print(f"== slimserve profile {name} --rounds 5", flush=True)
            subprocess.run([sys.executable, "-m", "slimserve", "profile", name, "--rounds", "5"], check=True)
    variants: list[Variant] = registered_variants(args.variants)
    ids = held_out_ids(VariantRegistry().resolve(args.variants[0]).path)
    port = free_port()
    command = [sys.executable, "-m", "slimserve", "serve", "--port", str(port)]
    for name in args.variants:
        command += ["--variant", name]
    scratch = None if args.trace_turns else Path(tempfile.mkdtemp(prefix="router-bench-"))
    trace = args.trace_turns or Path(scratch or ".") / "turns.jsonl"
    trace.write_text("")  # the server appends: only this run's turns
    command += ["--backend", "transformers", "--trace-turns", str(trace)]
    print("==", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results: list[Agreement] = []
    dump: list[dict[str, Any]] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        for rate in args.rates:
            workload = Workload(
                rate,
                args.count,
                args.cv,
                args.slo_scale,
                tuple(args.prompt_tokens),
                tuple(args.output_tokens),
                jitter=args.jitter,
                seed=args.seed,
            )
            requests = arrivals(workload, variants)
            simulated = simulate(variants, workload, "router")
            prompts = token_prompts(ids, requests, args.seed)
            live = asyncio.run(replay(f"http://127.0.0.1:{port}/v1", requests, prompts))
            began = median(row.start_pc - r.at_s for row, r in zip(live, requests, strict=True))
            at_host_speed = simulate(variants, workload, "router", host_speed=host_speed(trace, variants, began))
            results.append(compare(rate, requests, live, simulated, at_host_speed))
            print(results[-1].row(), flush=True)
            rows = zip(
                requests, live, simulated.latencies_ms, simulated.routed, at_host_speed.latencies_ms, strict=True
            )
            for request, row, ms, variant, at_host_ms in rows:
                dump.append(
                    {
                        "policy": "router",
                        "seed": args.seed,
                        "rate": rate,
                        "at": round(request.at_s, 3),
                        "prompt_tokens": request.prompt_tokens,
                        "max_tokens": request.output_tokens,
                        "budget_ms": round(request.budget_ms),
                        "variant": row.variant,
                        "ms": round(row.ms),
                        "start_pc": round(row.start_pc, 3),
                        "sequences": row.sequences,
                        "predicted_ms": row.predicted_ms,
                        "reason": row.reason,
                        "sim_variant": variant,
                        "sim_ms": round(ms),
                        "sim_host_ms": round(at_host_ms),
                    }
                )
    finally:
        stop(process)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.dump:
        args.dump.write_text("".join(json.dumps(row) + "\n" for row in dump))
    lines = heading("## Simulator fidelity: `make bench-router`", "benchmarks/router_bench.py")
    lines += [
        f"- variants: {', '.join(args.variants)}, all resident, "
        + ("each profiled (`slimserve profile`) just before the replay" if args.profile else "profiles as recorded"),
        f"- workload: the simulator's (seed {args.seed}, {args.count} requests per rate, cv {args.cv:g}, SLO scale "
        f"{args.slo_scale:g}), sent as completions with `model: auto`, exact prompt token ids, `ignore_eos`",
        "- error: median over requests of |simulated - live| / live latency; same variant: share routed alike",
        "- goals: error at most 10% at low load; live attainment within 5 points of simulated",
        "- at host speed: simulated again with each turn's cost scaled by how fast the "
        f"host ran decode turns against their profiles in that {WINDOW_S:g} s window of the live replay (the "
        "median ratio): the host's phases, which no profile foresees, apart from the model's own error",
        "",
        "| rate/s | requests | latency error (median) | same variant | attainment live | attainment simulated | "
        "live - simulated (points) | error at host speed | attainment simulated at host speed | "
        "live - simulated at host speed (points) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(r.row() for r in results),
    ]
    publish("\n".join(lines), args.write, "router-bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
