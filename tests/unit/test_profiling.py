from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.models import VariantManifest
from slimserve.server.profile import CostProfile, interpolate
from slimserve.server.profiling import Measured, ProfileConfig, measure_points
from tests.tiny import make_tiny_variant


def test_profile_records_the_figures_the_cost_profile_reads(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    manifest = VariantManifest.read(path)
    manifest.metrics["perplexity"] = 12.5
    manifest.write(path)
    argv = [
        "profile",
        "tiny-a",
        "--prompt-lengths",
        "16",
        "--batch-sizes",
        "2",
        "--contexts",
        "64",
        "999",
        "--repeats",
        "1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prefill    16 tokens" in printed and "step   2 rows" in printed and "at context 64" in printed
    assert "skipped lengths [999]: beyond the context of 256 tokens" in printed
    metrics = VariantManifest.read(path).metrics
    assert metrics["perplexity"] == 12.5  # other figures are kept
    profile = CostProfile.from_manifest(VariantManifest.read(path))
    assert profile.step_b1_ms == pytest.approx(1000 / metrics["decode_tok_s_b1"])
    assert profile.step_b8_ms == pytest.approx(8000 / metrics["decode_tok_s_b8"])
    assert profile.ttft_ms(128) == pytest.approx(metrics["ttft_ms_128"])
    assert profile.load_ms == pytest.approx(1000 * metrics["load_s"]) and profile.load_ms > 0
    # between the summary figures the profile follows the measured tables, not a line through them
    table = metrics["cost_profile"]
    assert set(table["step_ms"]) == {"1", "2", "8"} and set(table["context_step_ms"]) == {"64"}
    assert profile.step_ms(2) == pytest.approx(table["step_ms"]["2"])
    assert profile.ttft_ms(16) == pytest.approx(table["prefill_ms"]["16"])


def test_profile_without_write_leaves_the_manifest(slimserve_home: Path) -> None:
    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    before = VariantManifest.read(path).metrics
    argv = ["profile", "tiny-a", "--no-write", "--prompt-lengths", "8", "--batch-sizes", "1", "--contexts", "8"]
    assert main([*argv, "--repeats", "1"]) == 0
    assert VariantManifest.read(path).metrics == before


def test_interpolation_follows_the_measured_points_and_extends_the_end_segments() -> None:
    points = ((1, 10.0), (2, 12.0), (8, 30.0))
    assert interpolate(points, 1) == 10.0 and interpolate(points, 5) == pytest.approx(21.0)
    assert interpolate(points, 16) == pytest.approx(54.0)  # the 2-8 slope (3 ms a row) carried on
    profile = CostProfile(0.0, 1.0, step_b1_ms=10.0, step_b8_ms=30.0, load_ms=0.0, step_points=points)
    assert profile.step_ms(2) == pytest.approx(12.0)  # the line through b1 and b8 would say 12.86
    profile.observe_step(2, 0.024)  # twice the table: learning rescales it
    assert profile.step_ms(2) > 12.0


def test_a_vllm_profile_sits_beside_the_transformers_figures_and_reads_back_as_its_own(slimserve_home: Path) -> None:
    from slimserve.server.profiling import Measured

    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    manifest = VariantManifest.read(path)
    manifest.metrics.update({"ttft_ms_128": 50.0, "decode_tok_s_b1": 40.0, "decode_tok_s_b8": 160.0})
    manifest.metrics["cost_profile"] = {"prefill_ms": {"128": 50.0}, "step_ms": {"1": 25.0, "8": 50.0}}
    manifest.write(path)
    measured = Measured(
        prefill_ms={32: 6.0, 128: 12.0},
        step_ms={1: 4.0, 2: 4.5, 8: 8.0},
        context_step_ms={1024: 5.0},
        load_s=30.0,
        runtime="vllm",
        max_num_batched_tokens=2048,
    )
    manifest = VariantManifest.read(path)
    manifest.metrics.update(measured.metrics())
    manifest.write(path)
    metrics = VariantManifest.read(path).metrics
    assert metrics["ttft_ms_128"] == 50.0 and metrics["cost_profile"]["step_ms"] == {"1": 25.0, "8": 50.0}
    table = metrics["cost_profile_vllm"]
    assert table["max_num_batched_tokens"] == 2048 and table["decode_tok_s_b8"] == 1000.0
    transformers = CostProfile.from_manifest(VariantManifest.read(path))
    vllm = CostProfile.from_manifest(VariantManifest.read(path), runtime="vllm")
    assert transformers.step_ms(1) == pytest.approx(25.0) and transformers.ttft_ms(128) == pytest.approx(50.0)
    assert vllm.step_ms(1) == pytest.approx(4.0) and vllm.step_ms(2) == pytest.approx(4.5)
    assert vllm.ttft_ms(32) == pytest.approx(6.0) and vllm.load_ms == pytest.approx(30000.0)
    with pytest.raises(ValueError, match="runtime must be one of transformers, vllm"):
        CostProfile.from_manifest(None, runtime="llama.cpp")


def test_profile_on_vllm_refuses_where_vllm_does_not_import(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.server.vllm_engine import vllm_available

    if vllm_available():
        pytest.skip("vLLM imports here (the vLLM venv): the refusal is for the main venv")
    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    before = VariantManifest.read(path).metrics
    assert main(["profile", "tiny-a", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--backend vllm measures vLLM's engine, and vLLM does not import here" in err
    assert "slimserve profile tiny-a --backend vllm" in err
    assert VariantManifest.read(path).metrics == before


def test_points_are_measured_in_interleaved_rounds_so_a_slow_phase_slows_one_round_of_each() -> None:
    """A host's slow stretch falls on one round of every point, and the median over rounds drops it: measured
    point after point, it would cover every run of the points it fell on."""
    true_ms = {1: 36.0, 2: 38.2, 4: 40.4, 8: 46.5, 16: 56.8}
    calls: list[int] = []

    def step_ms(rows: int, context: int) -> float:
        calls.append(rows)
        return true_ms[rows] * (1.9 if 4 <= len(calls) <= 5 else 1.0)  # the host slow for two calls in a row

    config = ProfileConfig(prompt_lengths=[], batch_sizes=[1, 2, 4, 8, 16], contexts=[], rounds=3)
    found = measure_points(config, Measured(), 2048, 1024, lambda length: 10.0, step_ms, progress=lambda _: None)
    assert found.step_ms == true_ms
    assert calls == [1, 2, 4, 8, 16] * 3
    with pytest.raises(ValueError, match="--rounds must be at least 1"):
        ProfileConfig(rounds=0)
