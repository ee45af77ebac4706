"""Quantization benchmark: every method applied to a teacher (the default, or `--teacher`), measured by
`slimserve eval`.

    python benchmarks/quant_bench.py [--teacher NAME_OR_DIR] [--methods bnb-int8 ...] [--write docs/BENCHMARKS.md]

Variants are written to a scratch registry (`--home`, default `$SLIMSERVE_HOME/bench`) and rebuilt on
every run, so the table always reflects the current code (`--reuse` measures the ones already there).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from report import machine, today, write_section

from slimserve.compression.evaluate import EvalConfig, evaluate
from slimserve.compression.quantize import (
    INT8_EMBEDDING_METHODS,
    METHODS,
    method_config,
    quantize_variant,
)
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
    parser.add_argument("--teacher", default=DEFAULT_VARIANT, help="registered name or directory of the float teacher")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--home", type=Path, default=None, help="scratch registry [default: $SLIMSERVE_HOME/bench]")
    parser.add_argument("--extras", choices=["all", "emb8", "none"], default="all",
                        help="rows beyond one per method: int8 embedding (-emb8), int8 head (-head8)")  # fmt: skip
    parser.add_argument("--reuse", action="store_true",
                        help="measure variants already in the scratch registry instead of rebuilding them")  # fmt: skip
    parser.add_argument("--build-only", action="store_true",
                        help="build the variants and stop (measure them later, on a quiet host: --reuse)")  # fmt: skip
    parser.add_argument("--write", type=Path, default=None, help="write the table into this markdown file")
    args = parser.parse_args()

    teacher = VariantRegistry().resolve(args.teacher)
    scratch = VariantRegistry(args.home or slimserve_home() / "bench")
    config = EvalConfig()
    runs = [method_config(method, name=f"{teacher.name}-{method}") for method in args.methods]
    # weight-only methods also with one int8 table for the tied embedding and head (smaller and faster);
    # W8A8 methods with an int8 head of their own (faster, but the float embedding stays as well)
    runs += [
        method_config(method, embedding="int8", name=f"{teacher.name}-{method}-emb8")
        for method in args.methods
        if method in INT8_EMBEDDING_METHODS and args.extras in ("all", "emb8")
    ]
    runs += [
        method_config(method, keep=[], name=f"{teacher.name}-{method}-head8")
        for method in args.methods
        if method in ("int8-dynamic", "int8-static") and args.extras == "all"
    ]
    if not args.build_only:
        print(f"== teacher {teacher.name}", flush=True)
        teacher_metrics = evaluate(str(teacher.path), teacher=str(teacher.path), config=config, write=False)
        fp32_size = teacher_metrics["size_bytes"]
        rows = [row(teacher.name, "none (bf16 compute)", 32, teacher_metrics, teacher_metrics, fp32_size)]
    for quantize_config in runs:
        method, name = quantize_config.method, str(quantize_config.name)
        path = scratch.variants_dir / name
        print(f"== {name}", flush=True)
        if not (args.reuse and (path / "manifest.json").is_file()):
            shutil.rmtree(path, ignore_errors=True)
            path = quantize_variant(str(teacher.path), quantize_config, scratch)
        if args.build_only:
            continue
        metrics = evaluate(str(path), teacher=str(teacher.path), config=config)
        rows.append(row(path.name, method, METHODS[method].bits, metrics, teacher_metrics, fp32_size))
        print(rows[-1], flush=True)

    if args.build_only:
        return 0
    body = "\n".join(
        [
            f"## Quantization of {teacher.name}: `make bench-quant`"
            + ("" if args.teacher == DEFAULT_VARIANT else f" TEACHER={args.teacher}"),
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
            "- names: `-emb8` = one int8 table serves as embedding and output head (`--embedding int8`); "
            "`-head8` = the head quantized like the layers, the float embedding kept; otherwise the tied "
            "embedding/head stays bf16. int4 group size 128, 64 for layers whose input size 128 does not divide.",
            "",
            "| variant | method | bits | weights MB (of fp32) | RSS MB | tok/s b1 (vs teacher) | tok/s b8 | "
            "TTFT ms (128 tok) | perplexity (vs teacher) | KL | top-1 agree |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        key = "quant-bench" if args.teacher == DEFAULT_VARIANT else f"quant-bench-{teacher.name}"
        write_section(args.write, key, body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
