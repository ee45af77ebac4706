"""Fast CPU execution of integer weights saved in compressed-tensors format.

transformers loads a compressed-tensors checkpoint by decompressing the weights on every forward,
which is slower than the float model. On CPU, torch ships fused weight-only kernels
(`_weight_int8pack_mm`: int8 weights, per-channel scales, bf16/fp32 activations), so a quantized
Linear is swapped for a module that keeps its int8 weights and calls that kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Up to this many rows the fused kernel beats dequantize-then-GEMM; measured on a 1536x576 layer on
# 2 cores: bf16 M=1 0.03 vs 0.49 ms, M=8 0.11 vs 0.28 ms, M=128 1.6 vs 0.85 ms; fp32 M=1 0.37 vs
# 2.4 ms but M=32 12 vs 1.5 ms (the fp32 kernel is slow).
FUSED_KERNEL_MAX_ROWS = {torch.bfloat16: 16, torch.float32: 4}


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (W_int8 * scale).T + b, computed by torch's fused CPU kernel without materializing W."""

    weight_int8: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError(f"expected a 2-D int8 weight, got {weight_int8.dtype} {tuple(weight_int8.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", scales.reshape(-1).float())
        self.register_buffer("bias", bias)
        self._scales_by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        scales = self._scales_by_dtype.get(x.dtype)
        if scales is None:
            scales = self._scales_by_dtype.setdefault(x.dtype, self.scales.to(x.dtype))
        rows = x.reshape(-1, shape[-1])  # (M, K)
        if rows.shape[0] <= FUSED_KERNEL_MAX_ROWS.get(x.dtype, 0):
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, scales)  # (M, N)
        else:  # prefill and wide batches: one dequantization, then a regular GEMM, is faster
            y = torch.nn.functional.linear(rows, self.weight_int8.to(x.dtype) * scales[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def _int8_channel_scheme(module: nn.Module) -> bool:
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    if weights is None or getattr(scheme, "input_activations", None) is not None:
        return False
    return (
        weights.num_bits == 8
        and str(weights.type) in {"int", "QuantizationType.INT"}
        and str(weights.strategy) in {"channel", "QuantizationStrategy.CHANNEL"}
        and weights.symmetric
    )


def _unpacked_int8(module: Any) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(int(d) for d in module.weight_shape)
    return unpack_from_int32(module.weight_packed.data, 8, shape).to(torch.int8)


def accelerate_compressed_linears(model: nn.Module) -> int:
    """Replace every int8 channel-wise weight-only Linear by `Int8WeightOnlyLinear`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not hasattr(child, "weight_packed") or not _int8_channel_scheme(child):
                continue
            linear: Any = child
            bias = linear.bias.data if getattr(linear, "bias", None) is not None else None
            fast = Int8WeightOnlyLinear(_unpacked_int8(linear), linear.weight_scale.data, bias)
            setattr(parent, child_name, fast)
            replaced += 1
    return replaced


def is_compressed_tensors(config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) in {"compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS"}
