"""The engine's KV cache: fp32 storage written in place, so a decode step copies only its own token."""

from __future__ import annotations

import pytest
import torch

import slimserve.models.cpu_attention as cpu_attention
from slimserve.server.kv_cache import GROW_TOKENS, GrowingKVLayer, growing_cache
from tests.tiny import tiny_model


def _states(tokens: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, tokens, 8, dtype=torch.bfloat16)  # (B, kv heads, T, D)


def test_tokens_are_cached_once_in_fp32_and_written_in_place() -> None:
    layer = GrowingKVLayer()
    prompt_k, prompt_v = _states(5), _states(5)
    keys, values = layer.update(prompt_k, prompt_v)
    assert keys.dtype == values.dtype == torch.float32
    torch.testing.assert_close(keys, prompt_k.float())
    buffer = keys.data_ptr()
    written = [(prompt_k, prompt_v)]
    for _ in range(GROW_TOKENS):  # the room left after the prompt: no step copies the cache
        step = (_states(1), _states(1))
        keys, values = layer.update(*step)
        written.append(step)
        assert keys.data_ptr() == buffer
    keys, values = layer.update(_states(1), _states(1))  # full: the buffer grows once, the cache moves with it
    assert keys.data_ptr() != buffer
    assert layer.get_seq_length() == keys.shape[2] == 5 + GROW_TOKENS + 1
    expected_k = torch.cat([k for k, _ in written], dim=2).float()
    expected_v = torch.cat([v for _, v in written], dim=2).float()
    torch.testing.assert_close(keys[:, :, : expected_k.shape[2]], expected_k)
    torch.testing.assert_close(values[:, :, : expected_v.shape[2]], expected_v)


def test_assigned_rows_are_adopted_and_keep_growing() -> None:
    """The padded batch drops rows by assigning `keys`/`values`: later tokens append after what it kept."""
    layer = GrowingKVLayer()
    k, v = _states(4, batch=3), _states(4, batch=3)
    layer.update(k, v)
    layer.keys = layer.keys[torch.tensor([2, 0]), :, 1:]
    layer.values = layer.values[torch.tensor([2, 0]), :, 1:]
    step_k, step_v = _states(1), _states(1)
    keys, values = layer.update(step_k, step_v)
    torch.testing.assert_close(keys, torch.cat([k[[2, 0], :, 1:], step_k], dim=2).float())
    torch.testing.assert_close(values, torch.cat([v[[2, 0], :, 1:], step_v], dim=2).float())
    layer.values = _states(2)
    with pytest.raises(ValueError, match="2 value positions"):
        layer.update(step_k, step_v)


def test_a_growing_cache_decodes_as_transformers_own() -> None:
    model = tiny_model(300)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    logits = []
    for cache in (growing_cache(model.config), growing_cache(), None):
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            step = model(input_ids=torch.tensor([[11]]), past_key_values=out.past_key_values, use_cache=True)
        logits.append(step.logits[0, -1])
    assert all(isinstance(layer, GrowingKVLayer) for layer in growing_cache(model.config).layers)
    torch.testing.assert_close(logits[0], logits[2])
    torch.testing.assert_close(logits[1], logits[2])


def test_attention_upcasts_a_bf16_prefill_chunk_over_fp32_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU with native bf16, chunks of many queries otherwise run in bf16: fp32 keys from the cache
    would meet a bf16 query."""
    monkeypatch.setattr(cpu_attention, "native_bf16", lambda: True)
    queries = cpu_attention.FP32_QUERIES + 4
    query = torch.randn(1, 6, queries, 8, dtype=torch.bfloat16)
    key, value = torch.randn(1, 3, queries, 8), torch.randn(1, 3, queries, 8)
    module = torch.nn.Module()
    out, _ = cpu_attention.cpu_sdpa(module, query, key, value, None, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key, value, is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (1, queries, 6, 8)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
