"""bf16 models on CPUs without native bf16 run their attention in fp32, with the same masks as SDPA's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimserve.models.loader as loader
from slimserve.models import VariantRegistry, load_variant
from slimserve.models.fp32_attention import NAME, use_fp32_attention
from tests.tiny import make_tiny_variant, tiny_model


def test_padded_rows_give_the_logits_they_give_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the mask function registered beside the attention, padded rows would attend to padding."""
    model = tiny_model(400).to(torch.bfloat16)
    assert use_fp32_attention(model)
    assert model.config._attn_implementation == NAME
    seen: list[torch.dtype] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    short = torch.tensor([[5, 6, 7]])
    long = torch.tensor([[8, 9, 10, 11, 12, 13]])
    batch = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask, position_ids=position_ids).logits
        alone_short = model(input_ids=short).logits
        alone_long = model(input_ids=long).logits
    assert set(seen) == {torch.float32}
    assert together.dtype == torch.bfloat16
    torch.testing.assert_close(together[0, 3:], alone_short[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(together[1], alone_long[0], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_loads_switch_to_fp32_attention_only_without_native_bf16(
    slimserve_home: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny")
    monkeypatch.setattr(loader, "native_bf16", lambda: native)
    bf16 = load_variant("tiny", dtype="bf16", registry=registry).model
    fp32 = load_variant("tiny", dtype="fp32", registry=registry).model
    assert bf16.config._attn_implementation == ("sdpa" if native else NAME)
    assert fp32.config._attn_implementation == "sdpa"
