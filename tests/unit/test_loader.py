"""The compute dtype a variant is loaded in: `fast` follows what the machine runs natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimserve.compression.distill_config as distill_config
import slimserve.models.loader as loader
from slimserve.compression.distill_config import DistillConfig, DistillError
from slimserve.compression.quantize import QuantizeConfig, quantize_variant
from slimserve.models import VariantRegistry, load_variant
from tests.tiny import make_tiny_variant


@pytest.mark.parametrize("native", [True, False])
def test_fast_is_bf16_only_where_native_and_quantized_variants_keep_bf16(
    slimserve_home: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """Without native bf16 (an AVX2-only CPU) bf16 decoding was 1.6-2.6x slower than fp32, so a float
    variant stays fp32 there; the int8/int4 kernels stay bf16 on either kind of CPU."""
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny", hidden=128)
    quantized = quantize_variant("tiny", QuantizeConfig(method="int8-weight"), registry)
    monkeypatch.setattr(loader, "native_bf16", lambda: native)

    float_variant = load_variant("tiny", dtype="fast", registry=registry)
    expected = torch.bfloat16 if native else torch.float32
    assert float_variant.dtype == expected
    assert float_variant.model.get_input_embeddings().weight.dtype == expected
    assert load_variant(quantized, dtype="fast", registry=registry).dtype == torch.bfloat16
    # explicit dtypes are taken as given, whatever the machine
    assert load_variant("tiny", dtype="bf16", registry=registry).dtype == torch.bfloat16
    assert load_variant("tiny", dtype="auto", registry=registry).dtype == torch.float32


def test_distillation_autocasts_in_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DistillConfig(teacher="t", name="s")
    assert config.dtype == "fast"
    monkeypatch.setattr(distill_config, "native_bf16", lambda: False)
    assert config.autocast_dtype() == "fp32"
    assert DistillConfig(teacher="t", name="s", dtype="bf16").autocast_dtype() == "bf16"
    monkeypatch.setattr(distill_config, "native_bf16", lambda: True)
    assert config.autocast_dtype() == "bf16"
    with pytest.raises(DistillError, match="dtype must be fast, bf16 or fp32"):
        DistillConfig(teacher="t", name="s", dtype="fp16")


def test_unknown_dtypes_name_the_choices() -> None:
    with pytest.raises(ValueError, match="'auto' or 'fast'"):
        loader.parse_dtype("int3")
