"""The registration guard: a variant that predicts too little of what its source predicts is never registered."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from slimserve.cli import main
from slimserve.compression import quantize
from slimserve.compression.distill import DistillConfig, distill
from slimserve.compression.guard import AGREEMENT_FLOORS, GuardError, method_family
from slimserve.compression.quantize import QuantizationError, QuantizeConfig, method_config, quantize_variant
from slimserve.compression.smoothing import NORM_PLACEMENTS, NormPlacement
from slimserve.compression.student import StudentSpec
from slimserve.models import VariantManifest, VariantRegistry
from slimserve.models.registry import RegisteredVariant
from tests.tiny import CORPUS, make_tiny_variant


@dataclass
class ScrambledHead:
    """A broken method: it writes the source with its output head's weights shuffled (untied from the
    embedding), as a transform that mangles a tensor would. Everything else runs the real path."""

    name: str = "scrambled"
    bits: int = 8
    runtimes: list[str] = field(default_factory=lambda: ["transformers"])
    config: type[QuantizeConfig] = QuantizeConfig

    def check(self, model: Any, config: QuantizeConfig) -> None:
        pass

    def apply(self, source: RegisteredVariant, staging: Path, config: QuantizeConfig) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        weight = model.get_output_embeddings().weight.detach()
        shuffled = weight.flatten()[torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(0))]
        model.get_output_embeddings().weight = torch.nn.Parameter(shuffled.reshape(weight.shape))
        model.config.tie_word_embeddings = False
        model.save_pretrained(staging)
        return {}


@pytest.fixture
def registry(slimserve_home: Path, monkeypatch: pytest.MonkeyPatch) -> VariantRegistry:
    monkeypatch.setitem(quantize.METHODS, "scrambled", ScrambledHead())
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny")
    return registry


def test_a_broken_variant_is_refused_and_nothing_is_registered(registry: VariantRegistry) -> None:
    with pytest.raises(GuardError, match=r"refused to register tiny-scrambled: it agrees with its source tiny on"):
        quantize_variant("tiny", QuantizeConfig(method="scrambled"), registry)
    assert [p.name for p in registry.variants_dir.iterdir()] == ["tiny"]


def test_the_command_exits_non_zero_saying_why(registry: VariantRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "tiny", "--method", "scrambled"]) == 2
    error = capsys.readouterr().err
    assert "refused to register tiny-scrambled" in error and "below the 50% floor for scrambled" in error
    assert [p.name for p in registry.variants_dir.iterdir()] == ["tiny"]


def test_a_correct_variant_carries_the_guards_figures(registry: VariantRegistry) -> None:
    path = quantize_variant("tiny", QuantizeConfig(method="int8-weight"), registry)
    guard = VariantManifest.read(path).provenance["guard"]
    assert guard["source"] == "tiny" and guard["tokens"] == guard["windows"] * 128
    assert guard["top1_agreement"] >= guard["min_top1_agreement"] == AGREEMENT_FLOORS["8-bit"]
    assert 0 <= guard["kl_to_source"] < 0.01


def test_smoothing_with_another_architectures_rules_is_refused_before_writing(
    registry: VariantRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What happened on Gemma 3 270M: Llama's rules (divide the norm weight by s, smooth the norm after
    attention into gate/up) do not fit Gemma's (1 + w) norms; the smoothed float model no longer matches."""
    make_tiny_variant(registry.variants_dir / "gemma", name="gemma", arch="gemma3")
    monkeypatch.setitem(NORM_PLACEMENTS, "gemma3_text", NormPlacement())
    with pytest.raises(QuantizationError, match="smoothing changed Gemma3ForCausalLM's float logits"):
        quantize_variant("gemma", method_config("int8-dynamic", calibration_tokens=256), registry)
    assert sorted(p.name for p in registry.variants_dir.iterdir()) == ["gemma", "tiny"]


def test_a_student_that_learned_nothing_is_refused(registry: VariantRegistry, tmp_path: Path) -> None:
    """A fresh student with its own random head, one step in, predicts nothing of what the teacher does."""
    config = json.loads((registry.variants_dir / "tiny" / "config.json").read_text())
    (tmp_path / "student.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 3))
    run = DistillConfig(
        teacher="tiny",
        name="fresh",
        student=StudentSpec(calibration_tokens=256),
        student_config=str(tmp_path / "student.json"),
        data=[str(tmp_path / "corpus.txt")],
        seq_len=32,
        batch_size=2,
        max_steps=1,
    )
    with pytest.raises(GuardError, match=r"refused to register fresh.*checkpoints stay under"):
        distill(run, registry)
    assert [p.name for p in registry.variants_dir.iterdir()] == ["tiny"]


def test_families_and_their_floors() -> None:
    assert [method_family(m, b) for m, b in [("int8-weight", 8), ("bnb-nf4", 4), ("distill-qat-int4", 32)]] == [
        "8-bit",
        "4-bit",
        "distill",
    ]
    assert AGREEMENT_FLOORS["8-bit"] > AGREEMENT_FLOORS["4-bit"] > AGREEMENT_FLOORS["distill"]
