"""Decode-step time of served variants with transformers' DynamicCache and slimserve's growing fp32 cache.

    python benchmarks/kv_cache_speed.py [VARIANT ...] [--rounds 6] [--steps 20]

Each variant is loaded as the server loads it (`dtype=fast`, slimserve's CPU attention); per shape (batch size
and cached lengths, left-padded as the engine pads them) the two caches step in alternation, round by round,
so both see the same drift of the machine, and the medians and the median per-round ratio are printed (a
Markdown table). The growing cache's buffers are made with room, as the engine's prefill makes them.
"""

from __future__ import annotations

import argparse
from statistics import median

import torch
from attention_speed import SHAPES, step_ms
from transformers import DynamicCache

from slimserve.models import load_variant
from slimserve.server.kv_cache import growing_cache

CACHES = {"DynamicCache": DynamicCache, "growing fp32": growing_cache}
LONG = {"b8, 200-380 cached": [200, 380, 260, 310, 220, 350, 240, 290]}


@torch.inference_mode()
def compare(name: str, rounds: int, steps: int) -> list[str]:
    variant = load_variant(name, dtype="fast")
    rows = []
    for shape, lengths in {**SHAPES, **LONG}.items():
        times: dict[str, list[float]] = {kind: [] for kind in CACHES}
        for _ in range(rounds):
            for kind, new_cache in CACHES.items():
                times[kind].append(step_ms(variant.model, lengths, steps, new_cache))
        old, new = times.values()
        ratio = median(a / b for a, b in zip(old, new, strict=True))
        rows.append(
            f"| {name} ({str(variant.dtype).removeprefix('torch.')}) | {shape} | {median(old):.1f} "
            f"| {median(new):.1f} | {ratio:.2f}x |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", default=["smollm2-135m-student-int4", "smollm2-135m-instruct-int8"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print("| variant (compute dtype) | shape | DynamicCache ms | growing fp32 ms | speed-up (per round) |")
    print("|---|---|---:|---:|---:|")
    for name in args.variants:
        compare(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
