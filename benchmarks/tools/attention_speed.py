"""Decode-step time of served variants under transformers' SDPA attention and slimserve's CPU attention.

    python benchmarks/tools/attention_speed.py [VARIANT ...] [--rounds 6] [--steps 20]

Each variant is loaded as the server loads it (`dtype=fast`); per shape (batch size and cached lengths, the
rows of a batch left-padded as the engine pads them) the two attentions step in alternation, round by
round, so both see the same drift of the machine, and the medians and the median per-round ratio are
printed (a Markdown table). Also one 128-token prefill chunk each way.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from statistics import median

import torch
from transformers import DynamicCache

from slimserve.models import load_variant
from slimserve.models.cpu_attention import NAME
from slimserve.server.batch import PaddedKVBatch

SHAPES = {
    "b1, 40 cached": [40],
    "b1, 300 cached": [300],
    "b4, 60-300 cached": [60, 150, 300, 90],
    "b8, 40-300 cached": [60, 150, 90, 300, 40, 120, 80, 170],
}


def _prefilled(
    model: torch.nn.Module, tokens: int, new_cache: Callable[[], DynamicCache] = DynamicCache
) -> DynamicCache:
    cache = new_cache()
    model(input_ids=torch.randint(100, 5000, (1, tokens)), past_key_values=cache, use_cache=True, logits_to_keep=1)
    return cache


def step_ms(
    model: torch.nn.Module, lengths: list[int], steps: int, new_cache: Callable[[], DynamicCache] = DynamicCache
) -> float:
    """Median decode step (ms) of a batch of sequences with these cached lengths, after two warm-up steps."""
    batch = PaddedKVBatch()
    for tokens in lengths:
        batch.add(_prefilled(model, tokens, new_cache))
    times = []
    for _ in range(steps + 2):
        ids = torch.randint(100, 5000, (len(lengths), 1))
        mask, positions = batch.step_inputs()
        began = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache, use_cache=True)
        times.append(time.perf_counter() - began)
    return 1000 * median(times[2:])


def prefill_ms(model: torch.nn.Module, tokens: int = 128) -> float:
    began = time.perf_counter()
    _prefilled(model, tokens)
    return 1000 * (time.perf_counter() - began)


def ab_row(label: str, shape: str, before: Callable[[], float], after: Callable[[], float], rounds: int) -> str:
    """One table row: `before` and `after` (each returns ms) measured in alternation, round by round, so both
    see the same drift of the machine; their medians and the median per-round ratio."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(before())
        times[1].append(after())
    ratio = median(a / b for a, b in zip(*times, strict=True))
    row = f"| {label} | {shape} | {median(times[0]):.1f} | {median(times[1]):.1f} | {ratio:.2f}x |"
    print(row, flush=True)
    return row


def ab_shapes(
    label: str,
    shapes: dict[str, list[int]],
    before: Callable[[list[int]], float],
    after: Callable[[list[int]], float],
    rounds: int,
) -> list[str]:
    """`ab_row` for each shape: `before` and `after` take the shape's cached lengths and return ms."""
    return [
        ab_row(label, shape, functools.partial(before, lengths), functools.partial(after, lengths), rounds)
        for shape, lengths in shapes.items()
    ]


def run_table(description: str, before: str, after: str, compare: Callable[[str, int, int], list[str]]) -> None:
    """The command line shared by the side-by-side step benchmarks: variants, rounds, steps; a Markdown table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("variants", nargs="*", default=["smollm2-135m-student-int4", "smollm2-135m-instruct-int8"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"| variant (compute dtype) | shape | {before} ms | {after} ms | speed-up (per round) |")
    print("|---|---|---:|---:|---:|")
    for name in args.variants:
        compare(name, args.rounds, args.steps)


@torch.inference_mode()
def compare(name: str, rounds: int, steps: int) -> list[str]:
    variant = load_variant(name, dtype="fast")
    model = variant.model
    label = f"{name} ({str(variant.dtype).removeprefix('torch.')})"
    cases = {shape: lambda lengths=lengths: step_ms(model, lengths, steps) for shape, lengths in SHAPES.items()}
    cases["prefill, 128 tokens"] = lambda: prefill_ms(model)

    def under(implementation: str, measure: Callable[[], float]) -> Callable[[], float]:
        def timed() -> float:
            model.set_attn_implementation(implementation)
            return measure()

        return timed

    return [
        ab_row(label, shape, under("sdpa", measure), under(NAME, measure), rounds) for shape, measure in cases.items()
    ]


if __name__ == "__main__":
    run_table(__doc__.splitlines()[0], "transformers sdpa", "slimserve sdpa_cpu", compare)
