"""One yardstick for every variant: quality on held-out text, agreement with the teacher, size, memory, speed.

Quality (perplexity, KL(teacher || variant), top-1 agreement) is computed on the same sliding windows
for variant and teacher. Runtime figures (load time, peak RSS delta, decode tokens/s, time to first
token) are measured in a fresh subprocess, so one variant's allocations never inflate another's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from slimserve.compression.data import eval_text
from slimserve.compression.lineage import find_teacher
from slimserve.models.loader import LoadedVariant, load_variant
from slimserve.models.manifest import weights_size_bytes
from slimserve.models.registry import RegisteredVariant, VariantRegistry

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """How a variant is measured. Defaults fit a 2-core CPU in about a minute per variant."""

    max_tokens: int = 4096
    """Token budget of held-out text scored for perplexity and agreement."""
    window: int = 512
    """Context of each scoring window (tokens)."""
    stride: int = 256
    """New tokens scored per window; the rest of the window is context."""
    quality_dtype: str = "fp32"
    """Dtype for quality figures of float variants (quantized ones compute in their own dtype)."""
    runtime_dtype: str = "fast"
    """Dtype for speed figures: what the server runs (`fast`: bf16 where the machine runs it natively)."""
    decode_tokens: int = 64
    """Tokens generated per speed measurement."""
    prompt_tokens: int = 128
    """Prompt length for time to first token and decode speed."""
    repeats: int = 3
    """Speed runs per figure; the median is reported (2 shared cores are noisy)."""
    reference_dtype: str | None = None
    """Dtype of the teacher in the side-by-side timing (default: runtime_dtype). Another dtype answers
    "how much faster than the teacher in fp32" in one measurement; it is recorded as
    `speedup_b1_vs_<dtype>`, leaving `speedup_b1` (same dtype on both sides) as it was."""

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.window:
            raise ValueError(f"--stride must be in (0, window={self.window}], got {self.stride}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if self.reference_dtype not in (None, "bf16", "fp32", "fast"):
            raise ValueError(f"--reference-dtype must be bf16, fp32 or fast, got {self.reference_dtype!r}")


@dataclass
class QualityReport:
    perplexity: float
    scored_tokens: int
    kl_to_teacher: float | None = None
    """Mean KL(teacher || variant) per scored token, in nats."""
    top1_agreement: float | None = None
    """Share of scored tokens where variant and teacher rank the same token first."""
    teacher_perplexity: float | None = None
    """The teacher's perplexity on the same windows (the reference of quality ratios)."""


def _windows(ids: torch.Tensor, config: EvalConfig) -> list[tuple[torch.Tensor, torch.Tensor, slice]]:
    """(window (1, W), its scored targets (N,), the logit rows that predict them) for sliding-window scoring:
    each window scores only the tokens the previous one did not, with the rest of it as context."""
    windows = []
    prev_end = 0
    for begin in range(0, ids.numel() - 1, config.stride):
        end = min(begin + config.window, ids.numel())
        first_target = max(prev_end, begin + 1)
        if first_target >= end:
            break
        windows.append(
            (ids[begin:end].unsqueeze(0), ids[first_target:end], slice(first_target - 1 - begin, end - 1 - begin))
        )
        prev_end = end
        if end == ids.numel():
            break
    return windows


def _text_ids(variant: LoadedVariant, text: str, config: EvalConfig) -> torch.Tensor:
    ids = variant.tokenizer(text, return_tensors="pt")["input_ids"][0, : config.max_tokens]  # (T,)
    if ids.numel() < 2:
        raise ValueError("evaluation text is shorter than two tokens")
    return ids


@dataclass
class TeacherScores:
    """The teacher's log-probabilities on every scoring window of one text, computed once for all the
    variants measured against it: a recipe evaluates several, and running the teacher again for each gives the
    same numbers at half a minute a variant on a small CPU."""

    name: str
    ids: torch.Tensor
    """The scored text's token ids (a variant's tokenizer must give the same)."""
    vocab_size: int
    window: int
    stride: int
    text_sha1: str
    """Of the text and the token budget they were taken on (`matches`)."""
    log_probs: list[torch.Tensor]
    """Per window of `_windows`: (N, V) float32 log-probabilities of the scored positions (for 4096 tokens
    and a 49k vocabulary, 0.8 GB: `quality` given the teacher itself runs it window by window instead)."""
    nll_sum: float
    scored: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.scored)

    def matches(self, text: str, config: EvalConfig) -> bool:
        """Taken on this text, token budget and windows."""
        return (self.text_sha1, self.window, self.stride) == (_digest(text, config), config.window, config.stride)


def _digest(text: str, config: EvalConfig) -> str:
    return hashlib.sha1(f"{config.max_tokens}\n{text}".encode()).hexdigest()


@torch.inference_mode()
def teacher_scores(teacher: LoadedVariant, text: str, config: EvalConfig) -> TeacherScores:
    """Run the teacher once over the scoring windows of `text` (see `TeacherScores`)."""
    ids = _text_ids(teacher, text, config)
    log_probs, nll_sum, scored = [], 0.0, 0
    windows = _windows(ids, config)
    for window, targets, rows in tqdm(windows, desc=f"eval {teacher.name}", unit="window", leave=False):
        logq = torch.log_softmax(teacher.model(window).logits[0, rows].float(), dim=-1)  # (N, V)
        nll_sum += float(-logq.gather(1, targets.unsqueeze(1)).sum())
        scored += targets.numel()
        log_probs.append(logq)
    return TeacherScores(
        teacher.name,
        ids,
        len(teacher.tokenizer),
        config.window,
        config.stride,
        _digest(text, config),
        log_probs,
        nll_sum,
        scored,
    )


@torch.inference_mode()
def quality(
    variant: LoadedVariant,
    text: str,
    config: EvalConfig,
    teacher: LoadedVariant | TeacherScores | None = None,
) -> QualityReport:
    """Sliding-window perplexity; with a teacher (or its scores on this text), KL and top-1 agreement on
    the very same positions."""
    vocab_of_teacher = len(teacher.tokenizer) if isinstance(teacher, LoadedVariant) else None
    if isinstance(teacher, TeacherScores):
        vocab_of_teacher = teacher.vocab_size
    if vocab_of_teacher is not None and vocab_of_teacher != len(variant.tokenizer):
        raise ValueError(
            f"teacher and variant tokenizers differ ({vocab_of_teacher} vs {len(variant.tokenizer)} tokens)"
        )
    ids = _text_ids(variant, text, config)
    scores = teacher if isinstance(teacher, TeacherScores) else None
    if scores is not None and (not scores.matches(text, config) or not torch.equal(scores.ids, ids)):
        raise ValueError(
            f"the teacher's scores ({scores.name}) were taken on other text or windows than this evaluation's"
        )
    nll_sum, teacher_nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0.0, 0, 0
    windows = _windows(ids, config)
    for index, (window, targets, rows) in enumerate(
        tqdm(windows, desc=f"eval {variant.name}", unit="window", leave=False)
    ):
        logp = torch.log_softmax(variant.model(window).logits[0, rows].float(), dim=-1)  # (N, V)
        nll_sum += float(-logp.gather(1, targets.unsqueeze(1)).sum())
        if teacher is not None:
            if isinstance(teacher, LoadedVariant):  # window by window: one window's (N, V) in memory at a time
                logq = torch.log_softmax(teacher.model(window).logits[0, rows].float(), dim=-1)
                teacher_nll_sum += float(-logq.gather(1, targets.unsqueeze(1)).sum())
            else:
                logq = teacher.log_probs[index]
            vocab = min(logp.shape[1], logq.shape[1])
            logp_v, logq_v = logp[:, :vocab], logq[:, :vocab]
            kl_sum += float((logq_v.exp() * (logq_v - logp_v)).sum())
            agree += int((logp_v.argmax(-1) == logq_v.argmax(-1)).sum())
        scored += targets.numel()
    report = QualityReport(perplexity=math.exp(nll_sum / scored), scored_tokens=scored)
    if teacher is not None:
        report.kl_to_teacher = kl_sum / scored
        report.top1_agreement = agree / scored
        report.teacher_perplexity = scores.perplexity if scores is not None else math.exp(teacher_nll_sum / scored)
    return report


def _rss_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def speed_prompts(tokenizer: Any, prompt_tokens: int) -> torch.Tensor:
    """Eight prompts of `prompt_tokens` held-out tokens, 1000 tokens apart: what speed figures are timed on."""
    ids = tokenizer(eval_text(), return_tensors="pt")["input_ids"][0]
    return torch.stack([ids[i * 1000 : i * 1000 + prompt_tokens] for i in range(8)])  # (8, P)


def generate_timer(variant: LoadedVariant, prompts: torch.Tensor) -> Callable[[int, int, int], float]:
    """A function timing greedy generation of `new_tokens` for `rows` prompts from `offset` (seconds)."""
    model, tokenizer = variant.model, variant.tokenizer

    def generate(rows: int, new_tokens: int, offset: int) -> float:
        batch = prompts[offset : offset + rows]
        started = time.perf_counter()
        model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return time.perf_counter() - started

    return generate


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


@torch.inference_mode()
def runtime_in_this_process(ref: str, config: EvalConfig, reference: str | None = None) -> dict[str, float]:
    """Load time, peak RSS delta and speed; meant to run in a fresh process (see `runtime`).

    With a `reference` (the teacher), both decode in alternation, round by round, and the median per-round
    ratio is reported as `speedup_b1`: on a shared machine whose speed drifts by tens of percent between
    minutes, only figures taken side by side compare. The variant's own time to first token and batch-1
    speed are then the medians of its side of those rounds (timing it apart as well only repeated them).
    """
    rss_before = _rss_kb("VmRSS")
    started = time.perf_counter()
    variant = load_variant(ref, dtype=config.runtime_dtype)
    load_s = time.perf_counter() - started
    peak_delta_mb = (_rss_kb("VmHWM") - rss_before) / 1024
    prompts = speed_prompts(variant.tokenizer, config.prompt_tokens)
    generate = generate_timer(variant, prompts)

    generate(1, 4, 0)  # warm-up
    figures: dict[str, float] = {}
    if reference is None:
        ttft = median([generate(1, 1, i % 8) for i in range(config.repeats)])
        b1 = median([generate(1, config.decode_tokens, i % 8) for i in range(config.repeats)])
    else:
        reference_dtype = config.reference_dtype or config.runtime_dtype
        teacher = load_variant(reference, dtype=reference_dtype)
        key = "speedup_b1" if reference_dtype == config.runtime_dtype else f"speedup_b1_vs_{reference_dtype}"
        rounds = _side_by_side(generate, teacher, prompts, config)
        figures[key] = round(median(rounds.ratios), 3)
        ttft, b1 = median(rounds.first_s), median(rounds.full_s)
        del teacher
    b8 = median([generate(8, config.decode_tokens, 0) for _ in range(config.repeats)])
    return {
        "load_s": round(load_s, 2),
        "rss_mb": round(peak_delta_mb, 1),
        "ttft_ms_128": round(ttft * 1000, 1),
        "decode_tok_s_b1": round(config.decode_tokens / (b1 - ttft), 2),
        "decode_tok_s_b8": round(8 * config.decode_tokens / (b8 - ttft), 2),
        **figures,
    }


@dataclass
class Rounds:
    """The variant's side of side-by-side timing rounds, and each round's reference / variant decode time."""

    ratios: list[float]
    first_s: list[float]
    """Its time to the first token (a one-token generation), per round."""
    full_s: list[float]
    """Its time for `decode_tokens` tokens, prompt included, per round."""


def _side_by_side(
    generate: Callable[[int, int, int], float], reference: LoadedVariant, prompts: torch.Tensor, config: EvalConfig
) -> Rounds:
    """Rounds of batch-1 decoding of the variant and the reference in alternation (at least five)."""
    generate_reference = generate_timer(reference, prompts)
    generate_reference(1, 4, 0)  # warm-up
    rounds = Rounds([], [], [])

    def variant_decode_s(offset: int) -> float:
        full, first = generate(1, config.decode_tokens, offset), generate(1, 1, offset)
        rounds.first_s.append(first)
        rounds.full_s.append(full)
        return full - first

    def reference_decode_s(offset: int) -> float:
        return generate_reference(1, config.decode_tokens, offset) - generate_reference(1, 1, offset)

    for i in range(max(config.repeats, 5)):  # who goes first alternates, so drift favours neither
        if i % 2 == 0:
            variant_s, reference_s = variant_decode_s(i % 8), reference_decode_s(i % 8)
        else:
            reference_s, variant_s = reference_decode_s(i % 8), variant_decode_s(i % 8)
        rounds.ratios.append(reference_s / variant_s)
    return rounds


def runtime(ref: str, config: EvalConfig, reference: str | None = None) -> dict[str, float]:
    """Runtime figures from a fresh Python process, so the parent's memory and threads do not interfere."""
    command = [
        sys.executable,
        "-m",
        "slimserve.compression.evaluate",
        "--runtime",
        ref,
        "--config",
        json.dumps(asdict(config)),
    ]
    if reference is not None:
        command += ["--reference", reference]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"runtime measurement of {ref} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def evaluate(
    ref: str,
    teacher: str | None = None,
    text: str | None = None,
    config: EvalConfig | None = None,
    measure_runtime: bool = True,
    write: bool = True,
    registry: VariantRegistry | None = None,
    scores: TeacherScores | None = None,
) -> dict[str, Any]:
    """Measure a variant and (by default) record the figures in its manifest's `metrics`.

    `scores`: the teacher's scores on this text and windows (`teacher_scores`), when several variants are
    measured against one teacher; the teacher itself is then not run again, not even for its own figures."""
    config = config or EvalConfig()
    registry = registry or VariantRegistry()
    found = registry.resolve(ref)
    if teacher is not None:
        teacher_variant: RegisteredVariant | None = registry.resolve(teacher)
    else:
        teacher_variant, why = find_teacher(found, registry)
        if teacher_variant is None:
            log.warning("%s: KL and top-1 agreement not measured: %s", found.name, why)
    teacher_path = teacher_variant.path if teacher_variant is not None else None
    is_teacher = teacher_path is not None and teacher_path.resolve() == found.path.resolve()
    scored_text = text if text is not None else eval_text()
    if scores is not None:
        expected = teacher_variant.name if teacher_variant is not None else None
        if scores.name != expected:
            raise ValueError(f"the teacher scores are {scores.name}'s, but {ref} is measured against {expected}")
        if not scores.matches(scored_text, config):
            raise ValueError(f"the teacher scores ({scores.name}) were taken on other text or windows")
    if is_teacher and scores is not None:
        report = QualityReport(perplexity=scores.perplexity, scored_tokens=scores.scored)
        teacher_name = scores.name
    else:
        loaded = load_variant(found.path, dtype=config.quality_dtype)
        reference: LoadedVariant | TeacherScores | None = scores
        if reference is None and teacher_path is not None and not is_teacher:
            reference = load_variant(teacher_path, dtype=config.quality_dtype)
        report = quality(loaded, scored_text, config, reference)
        teacher_name = reference.name if reference is not None else found.name
        del loaded, reference
    metrics: dict[str, Any] = {
        "perplexity": round(report.perplexity, 4),
        "eval_tokens": report.scored_tokens,
        "eval_text": "pydoc_data held-out topics" if text is None else "user text",
        "size_bytes": weights_size_bytes(found.path),
    }
    if report.kl_to_teacher is not None:
        metrics |= {
            "kl_to_teacher": round(report.kl_to_teacher, 5),
            "top1_agreement": round(report.top1_agreement or 0.0, 4),
            "teacher_perplexity": round(report.teacher_perplexity or 0.0, 4),
            "teacher": teacher_name,
            "teacher_eval_tokens": report.scored_tokens,
        }
    elif is_teacher:
        metrics |= {
            "kl_to_teacher": 0.0,
            "top1_agreement": 1.0,
            "teacher": teacher_name,
            "teacher_eval_tokens": report.scored_tokens,
        }
    if measure_runtime:
        timed_beside = str(teacher_path) if teacher_path is not None and not is_teacher else None
        metrics |= runtime(str(found.path), config, timed_beside)
        if is_teacher:
            metrics["speedup_b1"] = 1.0
    if write:
        manifest = found.manifest
        manifest.metrics, kept = merge_metrics(manifest.metrics, metrics)
        for group, old, new in kept:
            log.warning(
                "%s: kept the recorded %s (measured on %d tokens) rather than this run's on %d",
                found.name,
                group,
                old,
                new,
            )
        manifest.write(found.path)
    return metrics


FIGURE_GROUPS = {
    "eval_tokens": ("perplexity", "eval_tokens", "eval_text"),
    "teacher_eval_tokens": ("kl_to_teacher", "top1_agreement", "teacher_perplexity", "teacher", "teacher_eval_tokens"),
}
"""Quality figures and the token count they were measured on (the key), recorded and replaced together."""


def merge_metrics(
    recorded: dict[str, Any], measured: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[str, int, int]]]:
    """`measured` over `recorded`, except a group of quality figures recorded on more tokens than this
    measurement's: a 64-token perplexity must not replace a 4096-token one. Returns the merged figures and
    (group, recorded tokens, measured tokens) for each group kept."""
    if "kl_to_teacher" in recorded and "teacher_eval_tokens" not in recorded and "eval_tokens" in recorded:
        recorded = {**recorded, "teacher_eval_tokens": recorded["eval_tokens"]}  # recorded before it had its own
    merged = {**recorded, **measured}
    kept = []
    for count, keys in FIGURE_GROUPS.items():
        old, new = (recorded.get(count) if keys[0] in recorded else None), measured.get(count)
        if old is None or new is None or int(old) <= int(new):
            continue
        for key in keys:
            merged.pop(key, None)
            if key in recorded:
                merged[key] = recorded[key]
        kept.append((", ".join(k for k in keys if k != count), int(old), int(new)))
    return merged, kept


def _main() -> None:
    parser = argparse.ArgumentParser(description="internal: runtime measurement in a fresh process")
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--reference", help="a variant to decode in alternation with it (speedup_b1)")
    args = parser.parse_args()
    config = EvalConfig(**json.loads(args.config))
    print(json.dumps(runtime_in_this_process(args.runtime, config, args.reference)))


if __name__ == "__main__":
    _main()
