"""Decode-step time of served int8/int4 variants with their projections apart and joined (`fused_projections`).

    python benchmarks/tools/fused_speed.py [VARIANT ...] [--rounds 6] [--steps 20]

Each variant is loaded twice as the server loads it (`dtype=fast`, slimserve's CPU attention and growing
cache), once with `fused=True`; per shape (batch size and cached lengths, left-padded as the engine pads
them) the two step in alternation, round by round, so both see the same drift of the machine, and the
medians and the median per-round ratio are printed (a Markdown table). Also one 128-token prefill each way.
"""

from __future__ import annotations

import torch
from attention_speed import SHAPES, ab_row, ab_shapes, prefill_ms, run_table, step_ms

from slimserve.models import load_variant
from slimserve.server.kv_cache import growing_cache


@torch.inference_mode()
def compare(name: str, rounds: int, steps: int) -> list[str]:
    apart, joined = load_variant(name, dtype="fast"), load_variant(name, dtype="fast", fused=True)
    label = f"{name} ({str(apart.dtype).removeprefix('torch.')})"
    rows = ab_shapes(
        label,
        SHAPES,
        lambda lengths: step_ms(apart.model, lengths, steps, growing_cache),
        lambda lengths: step_ms(joined.model, lengths, steps, growing_cache),
        rounds,
    )
    rows.append(
        ab_row(label, "prefill, 128 tokens", lambda: prefill_ms(apart.model), lambda: prefill_ms(joined.model), rounds)
    )
    return rows


if __name__ == "__main__":
    run_table(__doc__.splitlines()[0], "apart", "joined", compare)
