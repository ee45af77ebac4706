"""Which student shape heals best on a CPU budget: depth pruning, width pruning, or both, at about the
same parameter count, each trained for the same wall-clock minutes with the same KD loss and data.

    python benchmarks/student_shapes.py [--minutes 5] [--shape 20:1.0 24:0.75 ...] [--text FILE] [--write FILE]
    python benchmarks/student_shapes.py --speed-only --shape 24:0.5 24:0.6667 ... [--write FILE]

A shape is `LAYERS:MLP_RATIO` (blocks kept of 30, share of MLP channels kept in each). Each student is
measured by `slimserve eval` (held-out perplexity, KL, batch-1 decode side by side with the teacher) and,
with `--text`, on a second held-out text (e.g. `benchmarks/readme_text.py`'s package READMEs).
`--speed-only` skips training and quality (one optimiser step, so the variant is written) and times each shape
side by side with the teacher: speed depends on the shape, not on the weights.
Variants go to a scratch registry (`$SLIMSERVE_HOME/bench`) and are rebuilt on every run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from report import heading, publish

from slimserve.compression.distill import DistillConfig, distill
from slimserve.compression.evaluate import EvalConfig, evaluate, runtime
from slimserve.compression.student import StudentSpec
from slimserve.models import DEFAULT_VARIANT, VariantManifest, VariantRegistry, slimserve_home
from slimserve.models.cpu_kernels import native_bf16


def parse_shape(text: str) -> tuple[int, float]:
    layers, _, ratio = text.partition(":")
    return int(layers), float(ratio or 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["20:1.0", "24:0.75", "30:0.58"])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each student")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--freeze-embeddings", action="store_true", help="train with the embedding/head frozen")
    parser.add_argument("--text", type=str, default=None, help="a second held-out text to score")
    parser.add_argument("--speed-only", action="store_true", help="untrained students: side-by-side speed only")
    parser.add_argument("--write", type=str, default=None)
    args = parser.parse_args()
    if args.speed_only:
        return speed_only(args)

    teacher = VariantRegistry().resolve(DEFAULT_VARIANT)
    scratch = VariantRegistry(slimserve_home() / "bench")
    other = Path(args.text).read_text() if args.text else None
    config = EvalConfig(max_tokens=4096)
    teacher_other = (
        evaluate(
            str(teacher.path), teacher=str(teacher.path), text=other, config=config, measure_runtime=False, write=False
        )["perplexity"]
        if other
        else None
    )
    rows = []
    for shape in args.shape:
        layers, ratio = parse_shape(shape)
        path = cut(
            str(teacher.path),
            layers,
            ratio,
            scratch,
            lr=args.lr,
            max_steps=1_000_000,
            max_minutes=args.minutes,
            freeze_embeddings=args.freeze_embeddings,
        )
        m = evaluate(str(path), teacher=str(teacher.path), config=config, registry=scratch)
        manifest = VariantManifest.read(path)
        cell = "-"
        if other is not None and teacher_other:
            ppl = evaluate(
                str(path),
                teacher=str(teacher.path),
                text=other,
                config=config,
                measure_runtime=False,
                write=False,
                registry=scratch,
            )["perplexity"]
            cell = f"{ppl:.3f} ({ppl / teacher_other - 1:+.1%})"
        rows.append(
            f"| {layers} of 30 | {ratio:g} | {manifest.parameters / 1e6:.1f} | "
            f"{manifest.provenance.get('steps', 0)} | {m['speedup_b1']:.2f}x | "
            f"{m['perplexity']:.3f} ({m['perplexity'] / m['teacher_perplexity'] - 1:+.1%}) | "
            f"{m['kl_to_teacher']:.3f} | {cell} |"
        )
        print(rows[-1], flush=True)

    body = "\n".join(
        [
            *heading("## Student shapes: `python benchmarks/student_shapes.py`", "benchmarks/student_shapes.py"),
            f"- each student trained {args.minutes:g} min (forward-KL KD, lr {args.lr:g}, batch 4 x 256, "
            + ("embedding/head frozen, " if args.freeze_embeddings else "")
            + "pydoc + docstrings), blocks chosen by influence, MLP channels by activation; speed = the teacher's "
            "batch-1 decode time / the student's, side by side (median of 5 rounds)."
            + (f" Second text: {Path(args.text).name}, teacher {teacher_other:.3f}." if other else ""),
            "",
            "| blocks | MLP kept | params (M) | steps | b1 vs teacher | perplexity (vs teacher) | KL | second text |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    publish(body, args.write, "student-shapes")
    return 0


def cut(teacher: str, layers: int, ratio: float, scratch: VariantRegistry, **training: Any) -> Path:
    """The student of this shape, trained as `training` says, in the scratch registry."""
    name = f"shape-{layers}x{ratio:g}"
    shutil.rmtree(scratch.variants_dir / name, ignore_errors=True)
    shutil.rmtree(slimserve_home() / "runs" / name, ignore_errors=True)
    print(f"== {name}", flush=True)
    config = DistillConfig(
        teacher=teacher,
        name=name,
        student=StudentSpec(layers=layers, mlp_ratio=ratio),
        data=["builtin:pydoc", "builtin:docstrings"],
        checkpoint_every=1_000_000,
        **training,
    )
    return distill(config, scratch)


def speed_only(args: argparse.Namespace) -> int:
    teacher = VariantRegistry().resolve(DEFAULT_VARIANT)
    scratch = VariantRegistry(slimserve_home() / "bench")
    rows = []
    for shape in args.shape:
        layers, ratio = parse_shape(shape)
        path = cut(str(teacher.path), layers, ratio, scratch, max_steps=1)
        m = runtime(str(path), EvalConfig(), str(teacher.path))
        parameters = VariantManifest.read(path).parameters
        rows.append(f"| {layers} of 30 | {ratio:g} | {parameters / 1e6:.1f} | {m['speedup_b1']:.2f}x |")
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            *heading(
                "### Speed of each shape (untrained): `python benchmarks/student_shapes.py --speed-only`",
                "benchmarks/student_shapes.py",
            ),
            f"- batch-1 decode of 64 tokens after a 128-token prompt, {'bf16' if native_bf16() else 'fp32'} (what "
            "`fast` picks here), the teacher's time / the student's, "
            "side by side in one process (median of 5 alternating rounds).",
            "",
            "| blocks | MLP kept | params (M) | b1 vs teacher |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )
    publish(body, args.write, "student-shapes-speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
