from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimserve.cli import build_parser, main
from slimserve.models import VariantManifest
from tests.tiny import make_tiny_variant


def test_serve_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--variant",
        "--api-key",
        "--dtype",
        "--max-batch-size",
        "--max-waiting",
        "--memory-budget-mb",
        "--latency-budget-ms",
        "--min-quality",
        "--backend",
        "--public-metrics",
        "--shutdown-timeout",
    ):
        assert flag in out
    assert "/metrics" in " ".join(out.split())  # what --api-key guards besides /v1/*


def test_variants_list_shows_registered_variants(slimserve_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["variants", "list"]) == 0
    assert "no variants" in capsys.readouterr().out
    make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    assert main(["variants", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-a" in out and "none" in out


def test_serve_unknown_variant_fails_fast_with_a_clear_error(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--variant", "does-not-exist", "--port", "0"]) == 2
    assert "no variant 'does-not-exist'" in capsys.readouterr().err


def test_serve_with_an_unwritable_turn_trace_fails_before_serving(
    slimserve_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    variant = make_tiny_variant(tmp_path / "tiny")
    trace = tmp_path / "no-such-dir" / "turns.jsonl"
    assert main(["serve", "--variant", str(variant), "--port", "0", "--trace-turns", str(trace)]) == 2
    assert f"--trace-turns: cannot write {trace}" in capsys.readouterr().err


def test_serve_on_vllm_without_vllm_says_what_is_missing(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimserve.server.vllm_engine import vllm_available

    if vllm_available():
        pytest.skip("vLLM runs on this machine")
    assert main(["serve", "--backend", "vllm", "--port", "0"]) == 2
    assert "make setup-vllm" in capsys.readouterr().err
    assert main(["serve", "--min-quality", "superb", "--port", "0"]) == 2
    assert "tier" in capsys.readouterr().err


def test_quantize_flags_reach_the_recipe(slimserve_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimserve.models import VariantManifest

    make_tiny_variant(slimserve_home / "variants" / "tiny", name="tiny", hidden=128)
    argv = [
        "quantize",
        "tiny",
        "--method",
        "int8-dynamic",
        "--smoothing-alpha",
        "0.3",
        "--calibration-tokens",
        "256",
        "--name",
        "tiny-w8a8",
    ]
    assert main(argv) == 0
    provenance = VariantManifest.read(slimserve_home / "variants" / "tiny-w8a8").provenance
    assert provenance["smoothquant"] == {"alpha": 0.3, "calibration_tokens": 256, "smoothed_linears": 14}


def test_quantize_unknown_method_is_rejected_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["quantize", "tiny", "--method", "int3"])
    assert "int8-dynamic" in capsys.readouterr().err


def test_eval_on_a_users_text_prints_without_touching_the_manifest(
    slimserve_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_tiny_variant(slimserve_home / "variants" / "tiny-a", name="tiny-a")
    assert main(["eval", "tiny-a", "--no-runtime", "--max-tokens", "200"]) == 0
    standard = VariantManifest.read(path).metrics
    assert standard["eval_text"] == "pydoc_data held-out topics"
    text = tmp_path / "other.txt"
    text.write_text("A different domain: recipes for bread, with flour, water and salt. " * 30)
    capsys.readouterr()
    assert main(["eval", "tiny-a", "--text", str(text), "--no-runtime", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["eval_text"] == "user text" and printed["perplexity"] != standard["perplexity"]
    assert VariantManifest.read(path).metrics == standard  # what the router compares is unchanged
