"""The report of a compression run: a table and a plot of quality against size and speed, Pareto front marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimserve.models.registry import VariantRegistry


def speed_key(points: dict[str, dict[str, Any]]) -> str:
    """The speed figure to compare on: the side-by-side ratio to the teacher where every variant has one
    (absolute tokens/s taken minutes apart drift with the machine), else decode tokens/s."""
    return "speedup_b1" if points and all("speedup_b1" in p for p in points.values()) else "decode_tok_s_b1"


def pareto_front(points: dict[str, dict[str, Any]]) -> set[str]:
    """Names not dominated: no other variant is at least as good on perplexity, size and decode speed
    and strictly better on one (lower perplexity, smaller, faster)."""
    speed = speed_key(points)

    def dominates(a: dict[str, float], b: dict[str, float]) -> bool:
        at_least = a["perplexity"] <= b["perplexity"] and a["size_bytes"] <= b["size_bytes"]
        at_least = at_least and a.get(speed, 0.0) >= b.get(speed, 0.0)
        strictly = (
            a["perplexity"] < b["perplexity"]
            or a["size_bytes"] < b["size_bytes"]
            or a.get(speed, 0.0) > b.get(speed, 0.0)
        )
        return at_least and strictly

    return {name for name, p in points.items() if not any(dominates(q, p) for q in points.values())}


def table(teacher: str, metrics: dict[str, dict[str, Any]], registry: VariantRegistry) -> str:
    base = metrics.get(teacher, {})
    front = pareto_front(metrics)
    lines = [
        "| variant | method | bits | params (M) | weights MB | tok/s b1 | tok/s b8 | b1 vs teacher (side by side) | "
        "perplexity (vs teacher) | KL | top-1 agree | Pareto |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name, m in sorted(metrics.items(), key=lambda kv: kv[1]["size_bytes"], reverse=True):
        manifest = registry.resolve(name).manifest
        ratio = m["perplexity"] / base["perplexity"] - 1 if base.get("perplexity") else 0.0
        speed = m.get("decode_tok_s_b1")
        speed_b8 = m.get("decode_tok_s_b8")
        speedup = m.get("speedup_b1")
        lines.append(
            f"| {name} | {manifest.method} | {manifest.bits} | {manifest.parameters / 1e6:.1f} | "
            f"{m['size_bytes'] / 1e6:.1f} | {f'{speed:.1f}' if speed else '-'} | "
            f"{f'{speed_b8:.1f}' if speed_b8 else '-'} | {f'{speedup:.2f}x' if speedup else '-'} | "
            f"{m['perplexity']:.3f} ({ratio:+.1%}) | "
            f"{m.get('kl_to_teacher', float('nan')):.4f} | {m.get('top1_agreement', float('nan')):.1%} | "
            f"{'*' if name in front else ''} |"
        )
    return "\n".join(lines)


def plot(path: Path, teacher: str, metrics: dict[str, dict[str, Any]]) -> None:
    """Two panels: perplexity vs weights MB and perplexity vs decode tok/s; Pareto variants ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    speed = speed_key(metrics)
    speed_label = (
        "decode speed vs teacher, batch 1, side by side" if speed == "speedup_b1" else "decode tokens/s, batch 1"
    )
    panels = [("size_bytes", "weights (MB)", 1e6), (speed, speed_label, 1.0)]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        for name, m in metrics.items():
            if key not in m:
                continue
            x, y = m[key] / scale, m["perplexity"]
            on_front = name in front
            ax.scatter(
                [x],
                [y],
                s=80 if on_front else 40,
                marker="*" if name == teacher else "o",
                edgecolors="red" if on_front else "none",
                linewidths=1.5,
            )
            ax.annotate(name.replace(teacher, "T"), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ordered = sorted((metrics[n][key] / scale, metrics[n]["perplexity"]) for n in front if key in metrics[n])
        if len(ordered) > 1:
            ax.plot(*zip(*ordered, strict=True), "r--", linewidth=1, label="Pareto front")
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Variants of {teacher} (T = teacher); ringed: Pareto-optimal on perplexity, size and speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    directory: Path, recipe: str, teacher: str, metrics: dict[str, dict[str, Any]], registry: VariantRegistry
) -> Path:
    """Write report.md (table) and pareto.png into `directory`; returns the markdown path."""
    directory.mkdir(parents=True, exist_ok=True)
    plot(directory / "pareto.png", teacher, metrics)
    body = "\n".join(
        [
            f"# Compression report: {recipe}",
            "",
            f"Teacher: `{teacher}`. Perplexity on held-out text; KL(teacher || variant) per token; "
            "Pareto = not beaten on perplexity, size and decode speed at once by any other variant.",
            "",
            table(teacher, metrics, registry),
            "",
            "![quality against size and speed](pareto.png)",
            "",
        ]
    )
    out = directory / "report.md"
    out.write_text(body)
    return out
