"""`slimserve profile`: what a variant's turns cost on this host, measured as the engine's own turns (a
ready engine stepped by the profiler: chunked prefill, sampling, detokenizing and delivering included, as
the simulator charges a turn), recorded in its manifest where `CostProfile.from_manifest` reads it.

The manifest keeps the tables the cost profile interpolates (`cost_profile`: prefill milliseconds by
prompt length, decode-step milliseconds by rows, and one-row steps by context length, which the profile
does not read yet), plus the summary figures other readers use: `ttft_ms_128`, `decode_tok_s_b1` and
`decode_tok_s_b8` (rows per second of a decode step at 1 and 8 rows) and `load_s`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimserve.models.loader import LoadedVariant, load_variant
from slimserve.models.manifest import VariantManifest
from slimserve.models.registry import VariantRegistry
from slimserve.server.compute import ComputeThread
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.profile import VLLM_PROFILE_KEY
from slimserve.server.sampling import SamplingParams

PROFILE_PROMPT = 128
"""Prompt length of the manifest's time-to-first-token figure (`ttft_ms_128`)."""
PROFILE_BATCHES = (1, 8)
"""Rows of the manifest's step figures (`decode_tok_s_b1`, `decode_tok_s_b8`)."""


@dataclass
class ProfileConfig:
    """What `slimserve profile` measures: each point `rounds` times, each time `repeats` + 1 timings of the
    engine's turns."""

    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128, 256, 512])
    """Prompt lengths whose prefill is timed (tokens; 128 is always measured)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Rows whose decode step is timed (1 and 8 are always measured)."""
    contexts: list[int] = field(default_factory=lambda: [128, 1024])
    """Context lengths (tokens) at which a one-row step is timed: printed, not recorded."""
    repeats: int = 1
    """Timed runs of a point in each round after one untimed warm-up run; their median is the round's figure."""
    rounds: int = 3
    """Rounds over every point, each point once per round, the median over rounds kept: a slow phase of the
    shared host (stretches of seconds to minutes at up to 2x) then falls on every point alike, so the
    profile's shape (one row's step against sixteen's) stays the machine's, and one shorter than a round is
    dropped by the median."""
    dtype: str = "fast"
    """Compute dtype, as `slimserve serve --dtype` (fast: bf16 where the machine runs it natively)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        for flag, values in (
            ("--prompt-lengths", self.prompt_lengths),
            ("--batch-sizes", self.batch_sizes),
            ("--contexts", self.contexts),
        ):
            if any(v < 1 for v in values):
                raise ValueError(f"{flag} must be positive, got {values}")


@dataclass
class Measured:
    """Medians in milliseconds, keyed by prompt length, rows and context length."""

    prefill_ms: dict[int, float] = field(default_factory=dict)
    step_ms: dict[int, float] = field(default_factory=dict)
    context_step_ms: dict[int, float] = field(default_factory=dict)
    load_s: float = 0.0
    runtime: str = "transformers"
    """Whose engine ran the forwards: `transformers` (slimserve's) or `vllm` (`vllm_profiling`)."""
    max_num_batched_tokens: int | None = None
    """vLLM only: its token budget per step, which the simulator's vLLM engine chunks prompts by."""

    def record(self, path: Path, progress: Callable[[str], None] = print) -> None:
        """Into the manifest at `path`, beside what it holds (each runtime's figures under keys of its own)."""
        manifest = VariantManifest.read(path)
        manifest.metrics.update(self.metrics())
        written = manifest.write(path)
        progress(f"recorded in {written}: {self.metrics()}")

    def metrics(self) -> dict[str, Any]:
        """The manifest figures `CostProfile.from_manifest` reads: at the top level for the transformers
        engine; for vLLM, all under `cost_profile_vllm`, so neither runtime's figures overwrite the other's."""

        def table(ms: dict[int, float]) -> dict[str, float]:
            return {str(x): round(v, 2) for x, v in sorted(ms.items())}  # as the summary figures

        summary = {
            "ttft_ms_128": round(self.prefill_ms[PROFILE_PROMPT], 2),
            "decode_tok_s_b1": round(1000.0 / self.step_ms[1], 2),
            "decode_tok_s_b8": round(8000.0 / self.step_ms[8], 2),
            "load_s": round(self.load_s, 3),
        }
        tables = {
            "prefill_ms": table(self.prefill_ms),
            "step_ms": table(self.step_ms),
            "context_step_ms": table(self.context_step_ms),
        }
        if self.runtime == "transformers":
            return {**summary, "cost_profile": tables}
        return {VLLM_PROFILE_KEY: {**summary, **tables, "max_num_batched_tokens": self.max_num_batched_tokens}}


def _engine(variant: LoadedVariant) -> TransformersEngine:
    """A ready engine for `variant` whose turns the profiler takes itself: no load thread, and a compute
    thread never started, so each `step()` is one turn timed alone."""
    engine = TransformersEngine(
        lambda: variant, name=variant.name, metrics=ServerMetrics(), compute=ComputeThread(name="profile-unstarted")
    )
    engine.adopt(variant)
    return engine


def _prompt(length: int, vocab: int) -> list[int]:
    return [(7 * i + 3) % vocab for i in range(length)]


async def _turns(
    engine: TransformersEngine, prompts: list[list[int]], max_tokens: int
) -> list[tuple[float, dict[str, Any]]]:
    """Submit `prompts` (greedy, exactly `max_tokens` each) and take the engine's turns until it is idle:
    each turn's seconds and its record (`last_turn`: prefills, rows stepped)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    handles = [engine.submit(prompt, params) for prompt in prompts]
    turns = []
    while True:
        began = time.perf_counter()
        if not engine.step():
            break
        turns.append((time.perf_counter() - began, dict(engine.last_turn())))
        await asyncio.sleep(0)  # deliver the turn's events, as the server's event loop does between turns
    for handle in handles:
        async for _ in handle.events():
            pass
    return turns


def _median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


async def _prefill_ms(engine: TransformersEngine, length: int, vocab: int, repeats: int) -> float:
    """Turns from a prompt's arrival to its first token (every chunk, and sampling that token), the median
    of `repeats` runs after an untimed one: the first forward at a shape pays one-off costs."""
    runs = [await _turns(engine, [_prompt(length, vocab)], 1) for _ in range(repeats + 1)]
    return _median_ms([sum(seconds for seconds, _ in run) for run in runs[1:]])


async def _step_ms(engine: TransformersEngine, rows: int, context: int, vocab: int, repeats: int) -> float:
    """Decode turns of `rows` sequences of a `context`-token prompt stepping together (no prefill in the
    turn), the median of `repeats` after an untimed one."""
    turns = await _turns(engine, [_prompt(context, vocab)] * rows, rows + repeats + 2)
    full = [seconds for seconds, turn in turns if not turn["prefills"] and len(turn.get("rows", ())) == rows]
    if len(full) < repeats + 1:
        raise RuntimeError(f"{engine.name}: {len(full)} turns of {rows} rows, expected {repeats + 1}")
    return _median_ms(full[1 : repeats + 1])


def measure_points(
    config: ProfileConfig,
    found: Measured,
    context: int,
    room: int,
    prefill_ms: Callable[[int], float],
    step_ms: Callable[[int, int], float],
    progress: Callable[[str], None] = print,
) -> Measured:
    """The points every runtime's profile holds, into `found`: `prefill_ms(prompt tokens)` at each prompt
    length, `step_ms(rows, context)` at each row count (a 128-token context) and at each context (one row),
    each the median over `config.rounds` rounds that measure every point once. Lengths beyond `room` (what
    a `context`-token window leaves once the steps are taken) are skipped."""
    skipped = sorted(n for n in {*config.prompt_lengths, *config.contexts} if n > room)
    if skipped:
        progress(f"skipped lengths {skipped}: beyond the context of {context} tokens")
    lengths = sorted({PROFILE_PROMPT, *(n for n in config.prompt_lengths if n <= room)})
    batches = sorted({*PROFILE_BATCHES, *config.batch_sizes})
    contexts = sorted(n for n in config.contexts if n <= room)
    prefills: dict[int, list[float]] = {n: [] for n in lengths}
    steps: dict[int, list[float]] = {n: [] for n in batches}
    context_steps: dict[int, list[float]] = {n: [] for n in contexts}
    for round_ in range(1, config.rounds + 1):
        for length in lengths:
            prefills[length].append(prefill_ms(length))
        for rows in batches:
            steps[rows].append(step_ms(rows, PROFILE_PROMPT))
        for length in contexts:
            context_steps[length].append(step_ms(1, length))
        progress(
            f"round {round_}/{config.rounds}: step at {'/'.join(map(str, batches))} rows "
            + " / ".join(f"{steps[rows][-1]:.1f}" for rows in batches)
            + " ms"
        )
    found.prefill_ms.update({n: statistics.median(ms) for n, ms in prefills.items()})
    found.step_ms.update({n: statistics.median(ms) for n, ms in steps.items()})
    found.context_step_ms.update({n: statistics.median(ms) for n, ms in context_steps.items()})
    for length in lengths:
        progress(f"prefill {length:>5} tokens: {found.prefill_ms[length]:8.2f} ms")
    for rows in batches:
        progress(f"step {rows:>3} rows at context {PROFILE_PROMPT}: {found.step_ms[rows]:8.2f} ms")
    for length in contexts:
        progress(f"step   1 row  at context {length}: {found.context_step_ms[length]:8.2f} ms")
    return found


def measure(variant: LoadedVariant, config: ProfileConfig, progress: Callable[[str], None] = print) -> Measured:
    """Prefill time against prompt length, step time against rows (at a 128-token context) and against
    context (one row), each the median of the engine's own turns over `config.rounds` interleaved rounds."""
    steps = config.repeats + max(*config.batch_sizes, *PROFILE_BATCHES) + 2  # decoding extends the context
    room = variant.context_length - steps
    if room < PROFILE_PROMPT:
        raise ValueError(f"{variant.name}: a context of {variant.context_length} tokens is too short to profile")
    vocab = int(variant.model.config.vocab_size)
    engine = _engine(variant)
    loop = asyncio.new_event_loop()  # the engine's handles deliver their events on one
    try:
        with torch.inference_mode():
            return measure_points(
                config,
                Measured(load_s=variant.load_seconds),
                variant.context_length,
                room,
                lambda length: loop.run_until_complete(_prefill_ms(engine, length, vocab, config.repeats)),
                lambda rows, context: loop.run_until_complete(_step_ms(engine, rows, context, vocab, config.repeats)),
                progress,
            )
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def profile_variant(
    ref: str,
    config: ProfileConfig,
    write: bool = True,
    registry: VariantRegistry | None = None,
    progress: Callable[[str], None] = print,
) -> Measured:
    """Load `ref` as `slimserve serve` does, measure it, and (by default) record the figures in its manifest."""
    registry = registry or VariantRegistry()
    path = registry.resolve(ref).path
    progress(f"loading {ref} ({config.dtype})")
    variant = load_variant(path, dtype=config.dtype, registry=registry, fused=True)
    progress(f"loaded in {variant.load_seconds:.2f} s")
    found = measure(variant, config, progress)
    if write:
        found.record(path, progress)
    return found
