"""Serving benchmark: decode tokens/s at concurrency 1/4/8, TTFT p50/p95 and peak RSS, on the default model.

Runs slimserve and, when `llama-cpp-python[server]` is installed (the `bench` extra), llama.cpp's
OpenAI server on the same model's GGUF, one after the other in the same run, with the same client,
prompts and token budget. Every request asks for exactly `--max-tokens` tokens: EOS is banned through
the standard `logit_bias`, so both servers do the same amount of work.

    python benchmarks/serve_bench.py [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from openai import AsyncOpenAI
from report import machine, today, write_section

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List ten tips for writing clean Python code, with a sentence on each.",
    "Describe the water cycle in detail.",
    "What are the main differences between cats and dogs as pets?",
    "Write a letter to a friend describing your last holiday.",
    "Summarize the plot of a detective novel you would like to read.",
    "Give a step-by-step recipe for a simple tomato soup.",
]


@dataclass
class Phase:
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    ttft_s: list[float]

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def ttft_pct(self, q: float) -> float:
        ordered = sorted(self.ttft_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class ServerResult:
    name: str
    phases: list[Phase]
    peak_rss_mb: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MB."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int, eos_id: int) -> tuple[int, float]:
    started = time.perf_counter()
    ttft = float("nan")
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        logit_bias={str(eos_id): -100},
    )
    usage_tokens, content_chunks = None, 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            content_chunks += 1
            if ttft != ttft:
                ttft = time.perf_counter() - started
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
    # llama-cpp-python sends no usage in streams; it sends one chunk per token, so chunks count tokens
    return (usage_tokens if usage_tokens is not None else content_chunks), ttft


async def run_phase(
    base_url: str, model: str, concurrency: int, per_worker: int, max_tokens: int, eos_id: int
) -> Phase:
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    results: list[tuple[int, float]] = []

    async def worker(w: int) -> None:
        for i in range(per_worker):
            results.append(await one_request(client, model, PROMPTS[(w + i) % len(PROMPTS)], max_tokens, eos_id))

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return Phase(concurrency, len(results), sum(t for t, _ in results), wall, [f for _, f in results])


def bench_server(
    name: str, command: list[str], port: int, health: str, model: str, args: argparse.Namespace
) -> ServerResult:
    print(f"== {name}: {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}{health}", process)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_phase(base, model, 1, 1, 16, args.eos_id))  # warm-up
        phases = []
        for concurrency in args.concurrency:
            phase = asyncio.run(run_phase(base, model, concurrency, args.per_worker, args.max_tokens, args.eos_id))
            print(
                f"   c={concurrency}: {phase.tok_s:.1f} tok/s aggregate, TTFT p50 {phase.ttft_pct(0.5) * 1000:.0f} ms "
                f"p95 {phase.ttft_pct(0.95) * 1000:.0f} ms "
                f"({phase.requests} requests, {phase.completion_tokens} tokens)",
                flush=True,
            )
            phases.append(phase)
        return ServerResult(name, phases, peak_rss_mb(process.pid))
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def llama_cpp_available() -> bool:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return False
    return True


def render(results: list[ServerResult], args: argparse.Namespace) -> str:
    lines = [
        "## Serving: `make bench-serve`",
        "",
        f"- command: `python benchmarks/serve_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {today()}",
        f"- machine: {machine()}",
        f"- workload: chat requests from {len(PROMPTS)} prompts, exactly {args.max_tokens} completion tokens each "
        f"(EOS banned with logit_bias), greedy, streamed; each of c clients sends {args.per_worker} requests back to "
        "back; tok/s = all completion tokens / wall time of the phase; TTFT = time to the first content chunk.",
        "",
        "| server | concurrency | aggregate tok/s | TTFT p50 (ms) | TTFT p95 (ms) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for phase in result.phases:
            lines.append(
                f"| {result.name} | {phase.concurrency} | {phase.tok_s:.1f} | {phase.ttft_pct(0.5) * 1000:.0f} | "
                f"{phase.ttft_pct(0.95) * 1000:.0f} | {result.peak_rss_mb:.0f} |"
            )
    ours = {p.concurrency: p.tok_s for p in results[0].phases}
    lines.append("")
    if 1 in ours and 8 in ours:
        lines.append(
            f"slimserve aggregate at concurrency 8 / concurrency 1: **{ours[8] / ours[1]:.2f}x** (target >= 3x)."
        )
    for other in results[1:]:
        theirs = {p.concurrency: p.tok_s for p in other.phases}
        if 8 in ours and 8 in theirs:
            lines.append(f"slimserve / {other.name} at concurrency 8: **{ours[8] / theirs[8]:.2f}x** (target > 1x).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="client counts to measure")
    parser.add_argument("--per-worker", type=int, default=3, help="requests each client sends in sequence")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--eos-id", type=int, default=2, help="token id banned so every request runs to max-tokens")
    parser.add_argument("--dtype", default="fast", help="slimserve compute dtype")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="measure slimserve only")
    parser.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()

    from slimserve.models import VariantRegistry
    from slimserve.models.embedded import embedded_gguf_path

    VariantRegistry().resolve("smollm2-135m-instruct")  # convert once, outside the timed server start
    results = []
    port = free_port()
    results.append(
        bench_server(
            "slimserve",
            [
                sys.executable,
                "-m",
                "slimserve",
                "serve",
                "--port",
                str(port),
                "--dtype",
                args.dtype,
                "--log-level",
                "warning",
            ],
            port,
            "/health",
            "smollm2-135m-instruct",
            args,
        )
    )
    if not args.skip_llama_cpp and llama_cpp_available():
        port = free_port()
        gguf = embedded_gguf_path()
        results.append(
            bench_server(
                "llama-cpp-python",
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--n_threads",
                    str(os.cpu_count() or 2),
                    "--n_ctx",
                    "4096",
                    # by default a new request interrupts the running one; queue them instead
                    "--interrupt_requests",
                    "False",
                ],
                port,
                "/v1/models",
                str(gguf),
                args,
            )
        )
    elif not args.skip_llama_cpp:
        print("llama-cpp-python is not installed (pip install -e '.[bench]'): measuring slimserve only")
    section = render(results, args)
    print(section)
    if args.write:
        write_section(args.write, "serve-bench", section)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
