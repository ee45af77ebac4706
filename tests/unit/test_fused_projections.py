from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from slimserve.models import load_variant
from slimserve.models.cpu_kernels import Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear
from slimserve.models.fused_projections import FusedGateUpMLP, FusedQKVAttention, fuse_projections, joined_linear
from slimserve.server.batch import PaddedKVBatch
from slimserve.server.kv_cache import growing_cache
from tests.tiny import ARCHITECTURES
from tests.tiny_variants import shared_root, tiny_quantized, tiny_source

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


def test_int4_parts_that_split_a_packing_block_are_left_apart() -> None:
    """torch packs int4 rows in blocks of 64: a 32-row key projection in the middle would shift the blocks."""
    torch.manual_seed(0)
    parts = [_int4(64), _int4(32), _int4(32)]
    assert joined_linear(parts) is None
    last_partial = [_int4(64), _int4(64), _int4(32)]  # only the last block partial: still exact
    joined = joined_linear(last_partial)
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    assert joined is not None and torch.equal(joined(x), torch.cat([p(x) for p in last_partial], dim=-1))


def _decode(model: nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill each prompt, then decode both in one left-padded batch, as the engine does."""
    batch, logits = PaddedKVBatch(), []
    with torch.inference_mode():
        for prompt in prompts:
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
    return logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["int4-rtn", "int8-weight"])
def test_a_fused_variant_computes_what_the_unfused_one_does(
    tmp_path_factory: pytest.TempPathFactory, method: str, arch: str
) -> None:
    path = tiny_quantized(shared_root(tmp_path_factory), arch, method)
    plain = load_variant(path, dtype="bf16").model
    fused = load_variant(path, dtype="bf16").model
    report = fuse_projections(fused)
    layers = fused.model.layers
    if arch == "phi3":  # stored joined already: nothing to do, and said so
        assert report.fused == 0 and report.already_fused == {"Phi3Attention", "Phi3MLP"}
    elif method == "int4-rtn":  # 32-row keys and values would split torch's 64-row int4 packing blocks
        assert report.fused == len(layers) and all(isinstance(layer.mlp, FusedGateUpMLP) for layer in layers)
        assert "int4 parts that split a packing block" in report.skipped[type(layers[0].self_attn).__name__]
    else:
        assert report.fused == 2 * len(layers) and not report.skipped
        assert all(isinstance(layer.self_attn, FusedQKVAttention) for layer in layers)
        assert all(isinstance(layer.mlp, FusedGateUpMLP) for layer in layers)
    # longer than the sliding window of Mistral and Gemma 3, so windowed layers mask for real
    prompts = [torch.arange(5, 25).reshape(1, -1), torch.tensor([[9, 3, 77]])]
    for plain_logits, fused_logits in zip(_decode(plain, prompts), _decode(fused, prompts), strict=True):
        assert torch.equal(plain_logits, fused_logits)


def test_attention_of_an_architecture_not_covered_is_left_apart_and_named() -> None:
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from slimserve.models.cpu_kernels import Int8WeightOnlyLinear

    model = Olmo2ForCausalLM(Olmo2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1))
    attention = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):  # integer projections, which a covered attention would join
        linear = getattr(attention, name)
        weight = torch.randint(-127, 128, linear.weight.shape, dtype=torch.int8)
        setattr(attention, name, Int8WeightOnlyLinear(weight, torch.rand(linear.out_features) / 50, None))
    report = fuse_projections(model)
    assert "Olmo2Attention" in report.skipped and "not covered" in report.skipped["Olmo2Attention"]
    assert model.model.layers[0].self_attn is attention


def test_float_variants_are_not_fused(tmp_path_factory: pytest.TempPathFactory) -> None:
    model = load_variant(tiny_source(shared_root(tmp_path_factory), "llama"), dtype="fp32", fused=True).model
    assert not any(isinstance(m, FusedQKVAttention | FusedGateUpMLP) for m in model.modules())
