"""Attention in fp32 for bf16 models on CPUs that only emulate bf16.

The quantized variants compute in bf16 because torch's fused int8/int4 CPU kernels are fastest there,
whatever the CPU. The rest of the model follows their dtype, and on a CPU without native bf16 (no AVX-512
or AMX) the attention kernel is then emulated: decoding the int4 student on a 2-core AVX2-only EPYC,
`_scaled_dot_product_flash_attention_for_cpu` took 140-240 us per layer and step in bf16 against 70-80 us
in fp32 (torch profiler, batch 1, ~150 cached tokens). This attention casts query, key and value to fp32
around transformers' own SDPA path and the result back, so the weights, cache and everything else stay as
they are.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_fp32"
"""The attention implementation's name in transformers' registry (`config._attn_implementation`)."""


def sdpa_in_fp32(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


def use_fp32_attention(model: Any) -> bool:
    """Switch `model` to fp32 attention if it uses transformers' SDPA; False where it does not (left alone)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, sdpa_in_fp32)
    # the same masks as SDPA's: without one registered, transformers builds no mask at all for a custom
    # implementation, and padded rows of a batch would attend to their padding
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
