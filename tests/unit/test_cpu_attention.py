"""CPU attention: decode steps in fp32 with shared KV heads, the same masks and results as transformers' SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import slimserve.models.cpu_attention as cpu_attention
from slimserve.models import VariantRegistry, load_variant
from slimserve.models.cpu_attention import FP32_QUERIES, NAME, use_cpu_attention
from tests.tiny import make_tiny_variant, tiny_model

SHORT = [5, 6, 7]
LONG = [8, 9, 10, 11, 12, 13]


class SdpaSpy:
    """Records (query dtype, query heads, key heads, enable_gqa) of every SDPA call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[torch.dtype, int, int, bool]] = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(query: torch.Tensor, key: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            self.calls.append((query.dtype, query.shape[1], key.shape[1], bool(kwargs.get("enable_gqa"))))
            return sdpa(query, key, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


def _padded_decode(model: torch.nn.Module) -> torch.Tensor:
    """Prefill a left-padded batch of SHORT and LONG, then one decode step; the step's logits (2, vocab)."""
    batch = torch.tensor([[0, 0, 0, *SHORT], LONG])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache = DynamicCache()
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=batch, attention_mask=mask, position_ids=positions, past_key_values=cache)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(
            input_ids=torch.tensor([[20], [21]]),
            attention_mask=mask,
            position_ids=mask.sum(dim=1, keepdim=True) - 1,
            past_key_values=cache,
        )
    return step.logits[:, -1]


def test_padded_rows_give_the_logits_they_give_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the mask function registered beside the attention, padded rows would attend to padding."""
    model = tiny_model(400).to(torch.bfloat16)
    assert use_cpu_attention(model)
    assert model.config._attn_implementation == NAME
    spy = SdpaSpy(monkeypatch)
    batch = torch.tensor([[0, 0, 0, *SHORT], LONG])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask, position_ids=position_ids).logits
        alone_short = model(input_ids=torch.tensor([SHORT])).logits
        alone_long = model(input_ids=torch.tensor([LONG])).logits
    assert {dtype for dtype, *_ in spy.calls} == {torch.float32}  # a few queries: fp32 wherever bf16 runs
    assert together.dtype == torch.bfloat16
    torch.testing.assert_close(together[0, 3:], alone_short[0], atol=0.05, rtol=0.02)
    torch.testing.assert_close(together[1], alone_long[0], atol=0.05, rtol=0.02)


def test_a_padded_decode_step_shares_the_kv_heads_and_matches_transformers_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers' SDPA repeats grouped KV heads whenever a mask is given; this attention must not, and must
    compute the same step (fp32 model: nothing is rounded, so the results agree closely)."""
    model = tiny_model(400)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    expected = _padded_decode(model)
    use_cpu_attention(model)
    spy = SdpaSpy(monkeypatch)
    got = _padded_decode(model)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert spy.calls and all(call[1:] == (heads, kv_heads, True) for call in spy.calls)


@pytest.mark.parametrize("native", [True, False])
def test_long_chunks_stay_in_bf16_only_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Prefill chunks were on par in bf16 and fp32 where bf16 is native, about twice as slow in bf16 where not."""
    monkeypatch.setattr(cpu_attention, "native_bf16", lambda: native)
    model = tiny_model(400).to(torch.bfloat16)
    use_cpu_attention(model)
    spy = SdpaSpy(monkeypatch)
    with torch.no_grad():
        model(input_ids=torch.arange(3, 3 + FP32_QUERIES + 4)[None])  # one chunk longer than a decode step
        model(input_ids=torch.tensor([SHORT]))
    long_chunk, short_chunk = spy.calls[0][0], spy.calls[-1][0]
    assert long_chunk == (torch.bfloat16 if native else torch.float32)
    assert short_chunk == torch.float32


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_load_uses_the_cpu_attention(slimserve_home: Path, dtype: str) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny")
    model = load_variant("tiny", dtype=dtype, registry=registry).model
    assert model.config._attn_implementation == NAME
