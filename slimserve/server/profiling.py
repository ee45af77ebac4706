"""`slimserve profile`: what a variant's turns cost on this host, measured through the engine's own forwards
(chunked prefill into a growing cache; decode steps of a padded batch), recorded in its manifest where
`CostProfile.from_manifest` reads it.

The manifest keeps the tables the cost profile interpolates (`cost_profile`: prefill milliseconds by
prompt length, decode-step milliseconds by rows, and one-row steps by context length, which the profile
does not read yet), plus the summary figures other readers use: `ttft_ms_128`, `decode_tok_s_b1` and
`decode_tok_s_b8` (rows per second of a decode step at 1 and 8 rows) and `load_s`.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from slimserve.models.loader import LoadedVariant, load_variant
from slimserve.models.manifest import VariantManifest
from slimserve.models.registry import VariantRegistry
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.forward import prefill_forward, step_forward
from slimserve.server.kv_cache import growing_cache
from slimserve.server.profile import VLLM_PROFILE_KEY
from slimserve.server.scheduler import prompt_chunk

PROFILE_PROMPT = 128
"""Prompt length of the manifest's time-to-first-token figure (`ttft_ms_128`)."""
PROFILE_BATCHES = (1, 8)
"""Rows of the manifest's step figures (`decode_tok_s_b1`, `decode_tok_s_b8`)."""


@dataclass
class ProfileConfig:
    """What `slimserve profile` measures: each point costs `repeats` + 1 forwards (and a prefill per batch)."""

    prompt_lengths: list[int] = field(default_factory=lambda: [32, 128, 256, 512])
    """Prompt lengths whose prefill is timed (tokens; 128 is always measured)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Rows whose decode step is timed (1 and 8 are always measured)."""
    contexts: list[int] = field(default_factory=lambda: [128, 1024])
    """Context lengths (tokens) at which a one-row step is timed: printed, not recorded."""
    repeats: int = 3
    """Timed runs per point after one untimed warm-up run; the median is kept."""
    dtype: str = "fast"
    """Compute dtype, as `slimserve serve --dtype` (fast: bf16 where the machine runs it natively)."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
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


def _median_ms(run: Callable[[], float], repeats: int) -> float:
    run()  # untimed: the first forward at a shape pays one-off costs
    times = sorted(run() for _ in range(repeats))
    return 1000.0 * times[len(times) // 2]


def _prompt(length: int, vocab: int) -> list[int]:
    return [(7 * i + 3) % vocab for i in range(length)]


def _prefill(variant: LoadedVariant, prompt: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """The whole prompt, chunk by chunk as the engine's turns prefill it; the cache and the last logits."""
    cache = growing_cache(variant.model.config)
    done, logits = 0, torch.empty(0)
    while done < len(prompt):
        chunk = prompt_chunk(prompt, done)
        logits = prefill_forward(variant.model, cache, chunk)
        done += len(chunk)
    return cache, logits


def _timed_prefill(variant: LoadedVariant, prompt: list[int]) -> float:
    began = time.perf_counter()
    _, logits = _prefill(variant, prompt)
    logits.argmax(-1)
    return time.perf_counter() - began


def _batch(variant: LoadedVariant, rows: int, context: int) -> PaddedKVBatch:
    """`rows` copies of one prefilled `context`-token prompt, as a batch the engine steps."""
    cache, _ = _prefill(variant, _prompt(context, int(variant.model.config.vocab_size)))
    batch = PaddedKVBatch()
    for _ in range(rows):
        batch.add(copy.deepcopy(cache))
    return batch


def _timed_steps(variant: LoadedVariant, batch: PaddedKVBatch) -> Callable[[], float]:
    """One decode step of every row of `batch` per call, greedy token fed back (the cache grows by one)."""
    tokens = torch.ones((batch.size, 1), dtype=torch.long)  # (B, 1)

    def step() -> float:
        nonlocal tokens
        began = time.perf_counter()
        tokens = step_forward(variant.model, batch, tokens).argmax(-1, keepdim=True)  # (B, 1)
        return time.perf_counter() - began

    return step


@torch.inference_mode()
def measure(variant: LoadedVariant, config: ProfileConfig, progress: Callable[[str], None] = print) -> Measured:
    """Prefill time against prompt length, step time against rows (at a 128-token context) and against
    context (one row), each the median of `config.repeats` runs after a warm-up run."""
    room = variant.context_length - config.repeats - 2  # steps extend the context past the prompt
    if room < PROFILE_PROMPT:
        raise ValueError(f"{variant.name}: a context of {variant.context_length} tokens is too short to profile")
    vocab = int(variant.model.config.vocab_size)
    found = Measured(load_s=variant.load_seconds)
    skipped = sorted(n for n in {*config.prompt_lengths, *config.contexts} if n > room)
    if skipped:
        progress(f"skipped lengths {skipped}: beyond the context of {variant.context_length} tokens")
    for length in sorted({PROFILE_PROMPT, *(n for n in config.prompt_lengths if n <= room)}):
        timed = functools.partial(_timed_prefill, variant, _prompt(length, vocab))
        found.prefill_ms[length] = _median_ms(timed, config.repeats)
        progress(f"prefill {length:>5} tokens: {found.prefill_ms[length]:8.2f} ms")
    for rows in sorted({*PROFILE_BATCHES, *config.batch_sizes}):
        found.step_ms[rows] = _median_ms(_timed_steps(variant, _batch(variant, rows, PROFILE_PROMPT)), config.repeats)
        progress(f"step {rows:>3} rows at context {PROFILE_PROMPT}: {found.step_ms[rows]:8.2f} ms")
    for context in sorted(n for n in config.contexts if n <= room):
        found.context_step_ms[context] = _median_ms(_timed_steps(variant, _batch(variant, 1, context)), config.repeats)
        progress(f"step   1 row  at context {context}: {found.context_step_ms[context]:8.2f} ms")
    return found


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
        manifest = VariantManifest.read(path)
        manifest.metrics.update(found.metrics())
        written = manifest.write(path)
        progress(f"recorded in {written}: {found.metrics()}")
    return found
