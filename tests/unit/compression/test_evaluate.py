from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slimserve.compression.data import eval_text, train_texts
from slimserve.compression.evaluate import EvalConfig, evaluate, merge_metrics, quality, teacher_scores
from slimserve.compression.quantize import QuantizeConfig, quantize_variant
from slimserve.models import LoadedVariant, VariantManifest, VariantRegistry, load_variant
from tests.tiny import make_tiny_variant

TEXT = "The capital of France is Paris. " * 40


def test_held_out_text_is_disjoint_from_training_text() -> None:
    held_out = eval_text()
    assert len(held_out) > 50_000
    assert not any(doc in held_out for doc in train_texts())


def test_sliding_window_perplexity_matches_a_direct_computation(tiny_loaded: LoadedVariant) -> None:
    ids = tiny_loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :120]
    with torch.inference_mode():
        direct = tiny_loaded.model(ids, labels=ids).loss
    report = quality(tiny_loaded, TEXT, EvalConfig(max_tokens=120, window=256, stride=256))
    assert report.scored_tokens == 119
    assert report.perplexity == pytest.approx(math.exp(float(direct)), rel=1e-4)
    # overlapping windows score every token exactly once too
    strided = quality(tiny_loaded, TEXT, EvalConfig(max_tokens=120, window=64, stride=32))
    assert strided.scored_tokens == 119


def test_agreement_with_itself_is_perfect_and_with_another_model_is_not(
    tiny_loaded: LoadedVariant, tmp_path: Path
) -> None:
    config = EvalConfig(max_tokens=100, window=64, stride=32)
    same = quality(tiny_loaded, TEXT, config, teacher=tiny_loaded)
    assert same.kl_to_teacher == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    other = load_variant(make_tiny_variant(tmp_path / "other", layers=1, seed=1), dtype="fp32")
    # random tied models mostly predict their input token; an untied random head disagrees for real
    other.model.lm_head.weight = torch.nn.Parameter(torch.randn_like(other.model.lm_head.weight) * 8)
    different = quality(other, TEXT, config, teacher=tiny_loaded)
    assert different.kl_to_teacher is not None and different.kl_to_teacher > 0.01
    assert different.top1_agreement is not None and different.top1_agreement < 1.0


def test_evaluate_records_quality_and_runtime_in_the_manifest(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    path = make_tiny_variant(registry.variants_dir / "tiny", name="tiny")
    metrics = evaluate("tiny", config=EvalConfig(max_tokens=200, window=64, stride=32, decode_tokens=8))
    recorded = VariantManifest.read(path).metrics
    assert recorded == metrics
    assert recorded["kl_to_teacher"] == 0.0 and recorded["perplexity"] > 1
    for key in ("load_s", "rss_mb", "ttft_ms_128", "decode_tok_s_b1", "decode_tok_s_b8"):
        assert recorded[key] > 0, key
    # the teacher named by path is recognised as the variant itself
    by_path = evaluate(
        str(path),
        teacher=str(path),
        config=EvalConfig(max_tokens=200, window=64, stride=32),
        measure_runtime=False,
        write=False,
    )
    assert (by_path["kl_to_teacher"], by_path["teacher"]) == (0.0, "tiny")


def test_bad_config_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--stride"):
        EvalConfig(window=64, stride=128)


def test_a_variant_is_timed_side_by_side_with_its_teacher(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "deep", name="deep", layers=8)
    make_tiny_variant(registry.variants_dir / "shallow", name="shallow", layers=1, seed=1)
    config = EvalConfig(max_tokens=200, window=64, stride=32, decode_tokens=16)
    shallow = evaluate("shallow", teacher="deep", config=config, write=False)
    # decoded in alternation with the teacher: one block against eight is faster whatever the machine does
    assert shallow["speedup_b1"] > 1.2
    # its own batch-1 figures come from its side of those rounds
    assert shallow["ttft_ms_128"] > 0 and shallow["decode_tok_s_b1"] > 0
    assert evaluate("deep", teacher="deep", config=config, write=False)["speedup_b1"] == 1.0


def test_a_reference_in_another_dtype_is_recorded_apart(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "deep", name="deep", layers=8)
    make_tiny_variant(registry.variants_dir / "shallow", name="shallow", layers=1, seed=1)
    config = EvalConfig(max_tokens=200, window=64, stride=32, decode_tokens=16)
    evaluate("shallow", teacher="deep", config=config)
    same_dtype = VariantManifest.read(registry.variants_dir / "shallow").metrics["speedup_b1"]
    against_fp32 = evaluate("shallow", teacher="deep", config=replace(config, reference_dtype="fp32"))
    # tiny models gain nothing from bf16, so only the bookkeeping is asserted here, not the ratio
    assert "speedup_b1" not in against_fp32 and against_fp32["speedup_b1_vs_fp32"] > 0
    metrics = VariantManifest.read(registry.variants_dir / "shallow").metrics
    assert metrics["speedup_b1"] == same_dtype and metrics["speedup_b1_vs_fp32"] == against_fp32["speedup_b1_vs_fp32"]
    with pytest.raises(ValueError, match="--reference-dtype"):
        EvalConfig(reference_dtype="fp8")


def test_the_teachers_scores_taken_once_give_what_running_it_again_gives(
    tiny_loaded: LoadedVariant, tmp_path: Path
) -> None:
    config = EvalConfig(max_tokens=100, window=64, stride=32)
    other = load_variant(make_tiny_variant(tmp_path / "other", layers=1, seed=1), dtype="fp32")
    other.model.lm_head.weight = torch.nn.Parameter(torch.randn_like(other.model.lm_head.weight) * 8)
    scores = teacher_scores(tiny_loaded, TEXT, config)
    assert quality(other, TEXT, config, teacher=scores) == quality(other, TEXT, config, teacher=tiny_loaded)
    assert scores.perplexity == pytest.approx(quality(tiny_loaded, TEXT, config).perplexity, rel=1e-6)
    with pytest.raises(ValueError, match="other text or windows"):
        quality(other, TEXT[:-40], config, teacher=scores)
    with pytest.raises(ValueError, match="other text or windows"):
        quality(other, TEXT, replace(config, stride=16), teacher=scores)


def test_with_the_teachers_scores_the_teacher_is_not_run_again(slimserve_home: Path) -> None:
    registry = VariantRegistry()
    deep = make_tiny_variant(registry.variants_dir / "deep", name="deep", layers=4)
    make_tiny_variant(registry.variants_dir / "shallow", name="shallow", layers=1, seed=1)
    config = EvalConfig(max_tokens=200, window=64, stride=32)
    before = evaluate("shallow", teacher="deep", config=config, measure_runtime=False, write=False)
    teacher_before = evaluate("deep", teacher="deep", config=config, measure_runtime=False, write=False)
    scores = teacher_scores(load_variant(deep, dtype="fp32"), eval_text(), config)
    for weights in deep.glob("*.safetensors"):  # a teacher that can no longer load: only its scores remain
        weights.write_bytes(b"")
    after = evaluate("shallow", teacher="deep", config=config, measure_runtime=False, write=False, scores=scores)
    assert after == before
    teacher_after = evaluate("deep", teacher="deep", config=config, measure_runtime=False, write=False, scores=scores)
    assert teacher_after["perplexity"] == pytest.approx(teacher_before["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match="the teacher scores are deep's, but shallow is measured against shallow"):
        evaluate("shallow", teacher="shallow", config=config, measure_runtime=False, write=False, scores=scores)


def test_the_teacher_is_found_through_provenance_from_any_folder(
    slimserve_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A teacher kept outside the registry is found by the path its variants recorded, not by its name taken
    as a path relative to the working directory."""
    registry = VariantRegistry()
    teacher = make_tiny_variant(tmp_path / "models" / "teacher", name="teacher")
    path = quantize_variant(str(teacher), QuantizeConfig(method="int8-weight", name="teacher-int8"), registry)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = EvalConfig(max_tokens=100, window=64, stride=32)
    metrics = evaluate("teacher-int8", config=config, measure_runtime=False, write=False, registry=registry)
    assert metrics["teacher"] == "teacher" and metrics["kl_to_teacher"] >= 0.0
    assert metrics["teacher_eval_tokens"] == metrics["eval_tokens"] == 99

    shutil.rmtree(teacher)  # now nothing leads to it: said so, and the rest is still measured
    with caplog.at_level("WARNING"):
        metrics = evaluate("teacher-int8", config=config, measure_runtime=False, write=False, registry=registry)
    assert "kl_to_teacher" not in metrics and metrics["perplexity"] > 1
    assert "teacher-int8: KL and top-1 agreement not measured: its base model 'teacher' is not registered" in (
        caplog.text
    )
    assert VariantManifest.read(path).provenance["source_path"] == str(teacher.resolve())


def test_figures_on_more_tokens_are_not_replaced_by_figures_on_fewer(
    slimserve_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "deep", name="deep", layers=2)
    path = make_tiny_variant(registry.variants_dir / "shallow", name="shallow", layers=1, seed=1)
    run = lambda tokens: evaluate(  # noqa: E731
        "shallow", teacher="deep", config=EvalConfig(max_tokens=tokens, window=64, stride=32), measure_runtime=False
    )
    long = run(200)
    with caplog.at_level("WARNING"):
        short = run(64)
    recorded = VariantManifest.read(path).metrics
    assert short["eval_tokens"] == 63 and short["perplexity"] != long["perplexity"]
    for key in ("perplexity", "eval_tokens", "kl_to_teacher", "top1_agreement", "teacher_eval_tokens"):
        assert recorded[key] == long[key], key
    assert (
        "kept the recorded perplexity, eval_text (measured on 199 tokens) rather than this run's on 63" in caplog.text
    )
    longer = run(300)
    assert VariantManifest.read(path).metrics["perplexity"] == longer["perplexity"]


def test_figures_recorded_before_each_group_had_its_own_count_are_kept_too() -> None:
    recorded = {"perplexity": 20.0, "eval_tokens": 4096, "kl_to_teacher": 0.1, "teacher": "t", "size_bytes": 5}
    measured = {"perplexity": 30.0, "eval_tokens": 64, "kl_to_teacher": 0.3, "teacher": "t", "teacher_eval_tokens": 64}
    merged, kept = merge_metrics(recorded, {**measured, "size_bytes": 6})
    assert (merged["perplexity"], merged["kl_to_teacher"], merged["teacher_eval_tokens"]) == (20.0, 0.1, 4096)
    assert merged["size_bytes"] == 6 and [k[1:] for k in kept] == [(4096, 64), (4096, 64)]
