"""Distillation benchmark: the same student trained with the KD loss and with plain cross-entropy, same
data and same wall-clock budget, and the teacher's 4-bit QAT variant; each measured by `slimserve eval`.

    python benchmarks/distill_bench.py [--layers 20] [--minutes 7] [--qat-minutes 6] [--write docs/BENCHMARKS.md]

Variants are written to a scratch registry (`$SLIMSERVE_HOME/bench`) and rebuilt on every run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from report import machine, today, write_section

from slimserve.compression.distill import DistillConfig, distill
from slimserve.compression.evaluate import EvalConfig, evaluate
from slimserve.compression.quantize import quantize_variant
from slimserve.compression.student import StudentSpec
from slimserve.models import DEFAULT_VARIANT, VariantManifest, VariantRegistry, slimserve_home


def row(name: str, how: str, m: dict[str, Any], teacher: dict[str, Any], manifest: VariantManifest) -> str:
    provenance = manifest.provenance
    trained = (
        f"{provenance.get('steps', '-')} steps, {provenance.get('train_tokens', 0) / 1000:.0f}k tokens"
        if "steps" in provenance
        else "-"
    )
    return (
        f"| {name} | {how} | {manifest.parameters / 1e6:.1f} | {m['size_bytes'] / 1e6:.1f} | {trained} | "
        f"{m['decode_tok_s_b1']:.1f} ({m['decode_tok_s_b1'] / teacher['decode_tok_s_b1']:.2f}x) | "
        f"{m['perplexity']:.3f} ({m['perplexity'] / teacher['perplexity'] - 1:+.1%}) | {m['kl_to_teacher']:.4f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20, help="decoder blocks the student keeps (of 30)")
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget of each student run")
    parser.add_argument("--qat-minutes", type=float, default=6.0, help="budget of the teacher's int4 QAT run")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--write", type=str, default=None)
    args = parser.parse_args()

    teacher = VariantRegistry().resolve(DEFAULT_VARIANT)
    scratch = VariantRegistry(slimserve_home() / "bench")
    config = EvalConfig()
    print(f"== teacher {teacher.name}", flush=True)
    teacher_metrics = evaluate(str(teacher.path), teacher=str(teacher.path), config=config, write=False)
    rows = [row(teacher.name, "teacher (bf16 compute)", teacher_metrics, teacher_metrics, teacher.manifest)]

    runs = [
        (f"student{args.layers}-kd", "KD: forward KL to the teacher", 0.0),
        (f"student{args.layers}-ce", "cross-entropy on the same data", 1.0),
    ]
    for name, how, alpha in runs:
        shutil.rmtree(scratch.variants_dir / name, ignore_errors=True)
        print(f"== {name}", flush=True)
        path = distill(
            DistillConfig(
                teacher=str(teacher.path),
                name=name,
                student=StudentSpec(layers=args.layers),
                alpha=alpha,
                lr=args.lr,
                max_steps=1_000_000,
                max_minutes=args.minutes,
                checkpoint_every=1_000_000,
            ),
            scratch,
        )
        metrics = evaluate(str(path), teacher=str(teacher.path), config=config, registry=scratch)
        rows.append(row(name, how, metrics, teacher_metrics, VariantManifest.read(path)))
        print(rows[-1], flush=True)

    name = "teacher-qat-int4"
    for stale in (name, f"{name}-int4-rtn"):
        shutil.rmtree(scratch.variants_dir / stale, ignore_errors=True)
    print(f"== {name}", flush=True)
    run = DistillConfig(
        teacher=str(teacher.path),
        name=name,
        qat="int4",
        lr=2e-5,
        max_steps=1_000_000,
        max_minutes=args.qat_minutes,
        checkpoint_every=1_000_000,
    )
    trained = distill(run, scratch)
    exported = quantize_variant(str(trained), run.qat_export(), scratch)
    metrics = evaluate(str(exported), teacher=str(teacher.path), config=config, registry=scratch)
    rows.append(
        row(
            exported.name,
            "int4 QAT (KD, fake-quantized) -> int4-rtn",
            metrics,
            teacher_metrics,
            VariantManifest.read(trained),
        )
    )
    print(rows[-1], flush=True)

    body = "\n".join(
        [
            "## Distillation: `python benchmarks/distill_bench.py`",
            "",
            f"- command: `python benchmarks/distill_bench.py {' '.join(sys.argv[1:])}`".rstrip(),
            f"- date: {today()}",
            f"- machine: {machine()}",
            f"- students: {args.layers} of the teacher's 30 blocks, chosen by block influence, initialised from "
            f"the teacher; trained {args.minutes:g} min each (bf16 autocast, batch 4 x 256 tokens, lr {args.lr:g}, "
            "cosine) on the training split of pydoc_data topics; KD = forward KL on full distributions, CE = "
            "cross-entropy on the same tokens. QAT: the whole teacher with int4 fake-quantized weights (group "
            f"128/64, the int4-rtn grid), KD from the float teacher, {args.qat_minutes:g} min, lr 2e-5.",
            "- quality and speed as in the quantization table (4096 held-out tokens; fresh process per variant).",
            "",
            "| variant | how | params (M) | weights MB | trained | tok/s b1 (vs teacher) | "
            "perplexity (vs teacher) | KL |",
            "|---|---|---:|---:|---|---:|---:|---:|",
            *rows,
        ]
    )
    print(body)
    if args.write:
        from pathlib import Path

        write_section(Path(args.write), "distill-bench", body)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
