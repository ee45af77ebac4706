"""Decode-step time of served variants with transformers' DynamicCache and slimserve's growing fp32 cache.

    python benchmarks/tools/kv_cache_speed.py [VARIANT ...] [--rounds 6] [--steps 20]

Each variant is loaded as the server loads it (`dtype=fast`, slimserve's CPU attention); per shape (batch size
and cached lengths, left-padded as the engine pads them) the two caches step in alternation, round by round,
so both see the same drift of the machine, and the medians and the median per-round ratio are printed (a
Markdown table). The growing cache's buffers are made with room, as the engine's prefill makes them.
"""

from __future__ import annotations

import torch
from attention_speed import SHAPES, ab_shapes, run_table, step_ms
from transformers import DynamicCache

from slimserve.models import load_variant
from slimserve.server.kv_cache import growing_cache

LONG = {"b8, 200-380 cached": [200, 380, 260, 310, 220, 350, 240, 290]}


@torch.inference_mode()
def compare(name: str, rounds: int, steps: int) -> list[str]:
    variant = load_variant(name, dtype="fast")
    label = f"{name} ({str(variant.dtype).removeprefix('torch.')})"
    return ab_shapes(
        label,
        {**SHAPES, **LONG},
        lambda lengths: step_ms(variant.model, lengths, steps, DynamicCache),
        lambda lengths: step_ms(variant.model, lengths, steps, growing_cache),
        rounds,
    )


if __name__ == "__main__":
    run_table(__doc__.splitlines()[0], "DynamicCache", "growing fp32", compare)
