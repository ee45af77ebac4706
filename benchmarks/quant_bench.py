"""Quantization benchmark: every method applied to the default teacher, measured by `slimserve eval`.

    python benchmarks/quant_bench.py [--methods bnb-int8 bnb-nf4 ...] [--write docs/BENCHMARKS.md]

Variants are written to a scratch registry (`--home`, default `$SLIMSERVE_HOME/bench`) and rebuilt on
every run, so the table always reflects the current code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from report import machine, today, write_section

from slimserve.compression.evaluate import EvalConfig, evaluate
from slimserve.compression.quantize import METHODS, QuantizeConfig, quantize_variant
from slimserve.models import DEFAULT_VARIANT, VariantRegistry, slimserve_home

TARGETS = {
    8: "ppl within +1% of the teacher, weights <= 30% of fp32, decode b1 >= 1.5x the bf16 teacher",
    4: "ppl within +15% of the teacher, weights <= 20% of fp32, decode b1 faster than the bf16 teacher",
}


def row(name: str, method: str, bits: int, m: dict[str, Any], teacher: dict[str, Any], fp32_size: int) -> str:
    ppl_ratio = m["perplexity"] / teacher["perplexity"]
    speed_ratio = m["decode_tok_s_b1"] / teacher["decode_tok_s_b1"]
    return (
        f"| {name} | {method} | {bits} | {m['size_bytes'] / 1e6:.1f} ({m['size_bytes'] / fp32_size:.1%}) | "
        f"{m['rss_mb']:.0f} | {m['decode_tok_s_b1']:.1f} ({speed_ratio:.2f}x) | {m['decode_tok_s_b8']:.1f} | "
        f"{m['ttft_ms_128']:.0f} | {m['perplexity']:.3f} ({ppl_ratio - 1:+.1%}) | {m['kl_to_teacher']:.4f} | "
        f"{m['top1_agreement']:.1%} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--home", type=Path, default=None, help="scratch registry [default: $SLIMSERVE_HOME/bench]")
    parser.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()

    teacher = VariantRegistry().resolve(DEFAULT_VARIANT)
    scratch = VariantRegistry(args.home or slimserve_home() / "bench")
    config = EvalConfig()
    print(f"== teacher {teacher.name}", flush=True)
    teacher_metrics = evaluate(str(teacher.path), teacher=str(teacher.path), config=config, write=False)
    fp32_size = teacher_metrics["size_bytes"]
    rows = [row(teacher.name, "none (bf16 compute)", 32, teacher_metrics, teacher_metrics, fp32_size)]
    runs = [(method, ["lm_head"]) for method in args.methods]
    # the int8 methods also with the (tied) head quantized: faster, but the float embedding stays too
    runs += [(method, []) for method in args.methods if method.startswith("int8-")]
    for method, keep in runs:
        name = f"{teacher.name}-{method}" + ("" if keep else "-head8")
        shutil.rmtree(scratch.variants_dir / name, ignore_errors=True)
        print(f"== {name}", flush=True)
        path = quantize_variant(str(teacher.path), QuantizeConfig(method=method, keep=keep, name=name), scratch)
        metrics = evaluate(str(path), teacher=str(teacher.path), config=config)
        rows.append(row(path.name, method, METHODS[method].bits, metrics, teacher_metrics, fp32_size))
        print(rows[-1], flush=True)

    body = "\n".join(
        [
            "## Quantization: `make bench-quant`",
            "",
            f"- command: `python benchmarks/quant_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
            f"- date: {today()}",
            f"- machine: {machine()}",
            f"- quality: {config.max_tokens} tokens of held-out text (Python's pydoc_data topics, every 4th topic), "
            f"windows of {config.window} with stride {config.stride}, fp32 compute for float weights; "
            "KL(teacher || variant) in nats per token; agreement = same top-1 token as the teacher.",
            f"- speed: transformers `generate`, greedy, {config.prompt_tokens}-token prompt, "
            f"{config.decode_tokens} new tokens, bf16 activations, median of {config.repeats} runs, "
            "fresh process per variant; "
            "RSS = peak resident growth while loading.",
            f"- targets: 8-bit: {TARGETS[8]}; 4-bit: {TARGETS[4]}.",
            "",
            "| variant | method | bits | weights MB (of fp32) | RSS MB | tok/s b1 (vs teacher) | tok/s b8 | "
            "TTFT ms (128 tok) | perplexity (vs teacher) | KL | top-1 agree |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, "quant-bench", body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
