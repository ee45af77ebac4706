from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slimserve.cli import VERBS, build_configs, build_parser, main
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


def configs_of(argv: list[str]) -> list[Any]:
    args = build_parser().parse_args(argv)
    return build_configs(VERBS[args.verb], args)


def test_serve_reads_slimserve_environment_variables_under_config_file_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLIMSERVE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("SLIMSERVE_API_KEY", "from-env")
    (settings,) = configs_of(["serve"])
    assert (settings.max_batch_size, settings.api_key, settings.port) == (3, "from-env", 8000)
    config = tmp_path / "serve.yaml"
    config.write_text("max-batch-size: 4\nvariants: [a, b]\n")
    (settings,) = configs_of(["serve", "--config", str(config)])
    assert (settings.max_batch_size, settings.variants, settings.api_key) == (4, ["a", "b"], "from-env")
    (settings,) = configs_of(["serve", "--config", str(config), "--max-batch-size", "5", "--variant", "c"])
    assert (settings.max_batch_size, settings.variants) == (5, ["c"])


def test_an_environment_variable_changes_what_serve_does(
    slimserve_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLIMSERVE_MIN_QUALITY", "superb")
    assert main(["serve", "--variant", str(make_tiny_variant(tmp_path / "tiny")), "--port", "0"]) == 2
    assert "tier" in capsys.readouterr().err


def test_every_distill_field_has_a_flag(tmp_path: Path) -> None:
    argv = ["distill", "teacher", "--name", "s", "--layers", "2", "--weight-decay", "0.1", "--warmup-steps", "3"]
    argv += ["--generation-tokens", "12", "--qat", "int4", "--qat-group-size", "64", "--keep-layers", "0", "1"]
    (config,) = configs_of(argv)
    assert (config.teacher, config.name, config.weight_decay, config.warmup_steps) == ("teacher", "s", 0.1, 3)
    assert (config.generation_tokens, config.qat_group_size) == (12, 64)
    assert (config.student.layers, config.student.keep_layers) == (2, [0, 1])
    file = tmp_path / "distill.yaml"
    file.write_text("teacher: t\nname: from-file\nstudent: {mlp_ratio: 0.5}\nlr: 1.0e-3\n")
    (config,) = configs_of(["distill", "--config", str(file), "--layers", "3"])
    assert (config.teacher, config.name, config.lr) == ("t", "from-file", 1e-3)
    assert (config.student.layers, config.student.mlp_ratio) == (3, 0.5)


def test_a_config_file_with_an_unknown_key_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "quantize.yaml"
    file.write_text("method: int8-weight\ngroup_sise: 64\n")
    assert main(["quantize", "tiny", "--config", str(file)]) == 2
    assert "unknown key(s) group_sise" in capsys.readouterr().err
    assert main(["distill", "teacher"]) == 2
    assert "`name` is required" in capsys.readouterr().err


def test_flag_help_is_the_config_fields_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Weights per quantization group for group-wise 4-bit methods" in out  # QuantizeConfig.group_size
    assert "[default: 128]" in out


def test_a_flag_of_another_method_is_an_error_naming_the_flag_and_the_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quantize", "tiny", "--method", "int8-weight", "--damp", "0.1"]) == 2
    assert "--damp does not apply to --method int8-weight (only to int4-gptq)" in capsys.readouterr().err
    file = tmp_path / "quantize.yaml"
    file.write_text("method: bnb-nf4\nsmoothing_alpha: 0.3\n")
    assert main(["quantize", "tiny", "--config", str(file)]) == 2
    assert "--smoothing-alpha does not apply to --method bnb-nf4" in capsys.readouterr().err
    (_, config) = configs_of(["quantize", "tiny", "--config", str(file), "--method", "int8-static"])
    assert (config.method, config.smoothing_alpha, config.activation_quantile) == ("int8-static", 0.3, 1.0)


def test_quantize_help_groups_each_methods_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "only with --method int4-gptq: --damp DAMP" in out
    assert "only with --method int4-gptq, int4-rtn: --group-size GROUP_SIZE" in out
    assert "[default: 0.5 for int8-dynamic, 0.75 for int8-static]" in out


def test_qat_group_size_without_int4_qat_is_an_error_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "teacher", "--name", "s", "--qat-group-size", "64"]) == 2
    assert "--qat-group-size applies only with --qat int4 (this run's --qat: none)" in capsys.readouterr().err
    assert main(["distill", "teacher", "--name", "s", "--qat", "int4", "--qat-group-size", "100"]) == 2
    assert "--qat int4: --group-size must be 32, 64, 128 or 256, got 100" in capsys.readouterr().err
    (config,) = configs_of(["distill", "teacher", "--name", "s", "--qat", "int8"])
    assert config.qat_export().method == "int8-weight" and config.qat_grid == 128
