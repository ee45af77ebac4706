from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from slimserve.compression.quantize import QuantizeConfig, quantize_variant
from slimserve.models import VariantRegistry, load_variant
from slimserve.models.cpu_kernels import Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear
from slimserve.models.fused_projections import FusedGateUpMLP, FusedQKVAttention, joined_linear
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.kv_cache import growing_cache
from tests.tiny import make_tiny_variant

IN = 128
OUTS = (128, 64, 64)  # a query projection and two smaller key/value ones, as with grouped KV heads


def _int_weight(rows: int, low: int, high: int) -> torch.Tensor:
    return torch.randint(low, high, (rows, IN), dtype=torch.int8)


def _int4(rows: int) -> Int4WeightOnlyLinear:
    groups = IN // 32
    return Int4WeightOnlyLinear(
        _int_weight(rows, -8, 8), torch.rand(rows, groups) / 50, torch.randint(-8, 8, (rows, groups)), 32, None
    )


def _int8_weight(rows: int) -> Int8WeightOnlyLinear:
    return Int8WeightOnlyLinear(_int_weight(rows, -127, 128), torch.rand(rows) / 50, torch.randn(rows))


def _int8_dynamic(rows: int) -> Int8DynamicLinear:
    return Int8DynamicLinear(_int_weight(rows, -127, 128), torch.rand(rows) / 50, None)


def _int8_static(rows: int) -> Int8StaticLinear:
    return Int8StaticLinear(_int_weight(rows, -127, 128), torch.rand(rows) / 50, torch.tensor(0.02), None)


KERNELS: list[tuple[Callable[[int], nn.Module], torch.dtype]] = [
    (_int4, torch.bfloat16),
    (_int4, torch.float32),
    (_int8_weight, torch.bfloat16),
    (_int8_dynamic, torch.float32),
    (_int8_static, torch.float32),
]


@pytest.mark.parametrize(("make", "dtype"), KERNELS)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_a_joined_projection_equals_its_parts_side_by_side_bit_for_bit(
    make: Callable[[int], nn.Module], dtype: torch.dtype, rows: int
) -> None:
    torch.manual_seed(rows)
    parts = [make(n) for n in OUTS]
    joined = joined_linear(parts)
    assert joined is not None and type(joined) is type(parts[0])
    x = torch.randn(rows, IN, dtype=dtype)
    with torch.inference_mode():
        expected = torch.cat([p(x) for p in parts], dim=-1)
        assert torch.equal(joined(x), expected)


def test_projections_that_cannot_be_joined_are_left_apart() -> None:
    assert joined_linear([_int4(64), _int8_weight(64)]) is None  # different kernels
    assert joined_linear([nn.Linear(IN, 64), nn.Linear(IN, 64)]) is None  # float: no gain, other rounding
    other_scale = _int8_static(64)
    other_scale.input_scale.fill_(0.05)
    assert joined_linear([_int8_static(64), other_scale]) is None  # calibrated apart: not one quantization


@pytest.fixture
def registry(slimserve_home: Path) -> VariantRegistry:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny", hidden=128)
    return registry


@pytest.mark.parametrize("method", ["int4-rtn", "int8-weight"])
def test_a_fused_variant_computes_what_the_unfused_one_does(registry: VariantRegistry, method: str) -> None:
    path = quantize_variant("tiny", QuantizeConfig(method=method, calibration_tokens=256), registry)
    plain = load_variant(path, dtype="bf16", registry=registry).model
    fused = load_variant(path, dtype="bf16", registry=registry, fused=True).model
    layers = fused.model.layers
    assert all(isinstance(layer.self_attn, FusedQKVAttention) for layer in layers)
    assert all(isinstance(layer.mlp, FusedGateUpMLP) for layer in layers)

    prompts = [torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]]), torch.tensor([[9, 3, 77]])]
    batches = []
    with torch.inference_mode():
        for model in (plain, fused):
            batch, logits = PaddedKVBatch(), []
            for prompt in prompts:  # prefill each, then decode both in one left-padded batch
                cache = growing_cache()
                logits.append(model(input_ids=prompt, past_key_values=cache, use_cache=True).logits)
                batch.add(cache)
            for token in ([[11], [12]], [[13], [14]]):
                mask, positions = batch.step_inputs()
                out = model(
                    input_ids=torch.tensor(token),
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=batch.cache,
                    use_cache=True,
                )
                logits.append(out.logits)
            batches.append(logits)
    for plain_logits, fused_logits in zip(*batches, strict=True):
        assert torch.equal(plain_logits, fused_logits)


def test_float_variants_are_not_fused(registry: VariantRegistry) -> None:
    model = load_variant("tiny", dtype="fp32", registry=registry, fused=True).model
    assert not any(isinstance(m, FusedQKVAttention | FusedGateUpMLP) for m in model.modules())
