"""Compute dtype against speed, per variant: what `--dtype fast` chooses from, measured side by side.

    python benchmarks/dtype_speed.py [--variants NAME_OR_DIR ...] [--rounds 3] [--write FILE]

Each variant is loaded twice in one process, computing in fp32 and in bf16, and the two are timed in
alternation, round by round (two shared cores drift by tens of percent between minutes): time to first
token after a 128-token prompt of held-out text, then greedy decoding at batch 1 and 8 (transformers
`generate`, 32 new tokens). Quantized variants keep their integer weights either way; the dtype is the
activations'. Default variants: the teacher and what `make compress` registered.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from report import heading, publish

from slimserve.compression.evaluate import generate_timer, median, speed_prompts
from slimserve.models import DEFAULT_VARIANT, VariantRegistry, load_variant
from slimserve.models.cpu_kernels import native_bf16

DTYPES = ("fp32", "bf16")
NEW_TOKENS = 32
PROMPT_TOKENS = 128


@torch.inference_mode()
def measure(ref: str, rounds: int) -> dict[str, dict[str, float]]:
    """Per dtype: TTFT (ms) and decode tok/s at batch 1 and 8, medians of alternated rounds."""
    timers = {}
    for dtype in DTYPES:
        variant = load_variant(ref, dtype=dtype)
        timers[dtype] = generate_timer(variant, speed_prompts(variant.tokenizer, PROMPT_TOKENS))
        timers[dtype](1, 4, 0)  # warm-up
    samples: dict[str, dict[str, list[float]]] = {d: {"ttft": [], "b1": [], "b8": []} for d in DTYPES}
    for i in range(rounds):
        for dtype in DTYPES if i % 2 == 0 else DTYPES[::-1]:  # who goes first alternates
            generate = timers[dtype]
            ttft = generate(1, 1, i % 8)
            samples[dtype]["ttft"].append(ttft)
            samples[dtype]["b1"].append(NEW_TOKENS / max(generate(1, NEW_TOKENS, i % 8) - ttft, 1e-6))
            samples[dtype]["b8"].append(8 * NEW_TOKENS / max(generate(8, NEW_TOKENS, 0) - ttft, 1e-6))
    return {
        d: {"ttft_ms": 1000 * median(s["ttft"]), "b1": median(s["b1"]), "b8": median(s["b8"])}
        for d, s in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=None, help="variants (names or directories)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    registry = VariantRegistry()
    teacher = registry.resolve(DEFAULT_VARIANT).name
    refs = args.variants or [teacher] + [
        v.name for v in registry.list() if v.manifest.family == teacher and v.name != teacher
    ]
    lines = heading("## Compute dtype and speed: `python benchmarks/dtype_speed.py`", "benchmarks/dtype_speed.py")
    lines += [
        f"- native bf16 here: {'yes' if native_bf16() else 'no'}, so `--dtype fast` computes float variants in "
        f"{'bf16' if native_bf16() else 'their stored dtype (fp32)'} and quantized ones in bf16",
        f"- {PROMPT_TOKENS}-token prompts of held-out text, {NEW_TOKENS} greedy tokens, median of {args.rounds} "
        "rounds, fp32 and bf16 timed in alternation in one process",
        "",
        "| variant | TTFT ms fp32 | TTFT ms bf16 | tok/s b1 fp32 | tok/s b1 bf16 | tok/s b8 fp32 | tok/s b8 bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ref in refs:
        print(f"== {ref}", file=sys.stderr, flush=True)
        m = measure(ref, args.rounds)
        lines.append(
            f"| {Path(ref).name} | {m['fp32']['ttft_ms']:.0f} | {m['bf16']['ttft_ms']:.0f} | {m['fp32']['b1']:.1f} "
            f"| {m['bf16']['b1']:.1f} | {m['fp32']['b8']:.1f} | {m['bf16']['b8']:.1f} |"
        )
    publish("\n".join(lines), args.write, "dtype-speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
