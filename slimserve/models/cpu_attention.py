"""Attention for bf16 models on the CPU: decode steps in fp32, with the KV heads shared, not repeated.

The quantized variants compute in bf16 because torch's fused int8/int4 CPU kernels are fastest there, and
on a CPU with native bf16 the float variants do too (twice as fast as fp32 for decoding). The rest of the
model follows their dtype, but torch's bf16 attention kernel on the CPU is slow for the few queries of a
decode step (several times fp32's with shared KV heads), transformers' SDPA path repeats the grouped KV
heads whenever a mask is given (every padded batch), and where bf16 is only emulated (AVX2) every bf16
attention is about twice as slow as fp32. `benchmarks/tools/attention_speed.py` times both side by side.

So this attention casts query, key and value to fp32 around torch's SDPA for decode steps (up to
`FP32_QUERIES` queries), for every call where bf16 is emulated, and whenever the cache hands it fp32 keys
(the serving engine's cache stores them in fp32 once, `server.kv_cache`, rather than have every step cast
the whole cache); the weights and everything else stay as they are.
"""

from __future__ import annotations

from typing import Any

import torch

from slimserve.models.cpu_kernels import native_bf16

NAME = "sdpa_cpu"
"""The attention implementation's name in transformers' registry (`config._attn_implementation`)."""

FP32_QUERIES = 16
"""Up to this many queries per call (decode steps, short chunks) attention runs in fp32 even where bf16 is
native: fp32 stays ahead up to about this many queries (`benchmarks/tools/attention_speed.py`)."""


def cpu_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (B, heads, Q, D) query, (B, kv heads, T, D) key and value, a
    boolean or additive mask (B, 1, Q, >= T) or None; returns (B, Q, heads, D) in the query's dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    dtype, queries = query.dtype, query.shape[2]
    upcast = dtype != torch.float32 and (queries <= FP32_QUERIES or not native_bf16() or key.dtype == torch.float32)
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
        if upcast and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and queries > 1 and attention_mask is None)
    if causal and key.shape[2] > queries:  # as transformers: SDPA aligns `is_causal` to the upper left
        key, value = key[:, :, :queries], value[:, :, :queries]
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous().to(dtype), None


def use_cpu_attention(model: Any) -> bool:
    """Switch `model` to this attention if it uses transformers' SDPA; False where it does not (left alone)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, cpu_sdpa)
    # the same masks as SDPA's: without one registered, transformers builds no mask at all for a custom
    # implementation, and padded rows of a batch would attend to their padding
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
