from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.models import VariantManifest
from slimserve.server.profile import CostProfile
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


def test_profile_without_write_leaves_the_manifest(slimserve_home: Path) -> None:
    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    before = VariantManifest.read(path).metrics
    argv = ["profile", "tiny-a", "--no-write", "--prompt-lengths", "8", "--batch-sizes", "1", "--contexts", "8"]
    assert main([*argv, "--repeats", "1"]) == 0
    assert VariantManifest.read(path).metrics == before
