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


class Int8DynamicLinear(nn.Module):
    """W8A8: each row of x is quantized to int8 with its own scale, then an int8 x int8 -> int32 GEMM.

    Several rows (prefill, batched decode) go through `torch._int_mm` with one scale per row: torch's
    eager dynamic kernels use one scale per call, which costs quality when a call holds many tokens.
    A single row (decode at batch 1) goes through fbgemm's fused dynamic kernel, about 2x faster than a
    bf16 GEMV there (0.046 vs 0.096 ms for 1536x576 on 2 cores); with one row its scale is per token too.
    """

    weight_t: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_t", weight_int8.t().contiguous())  # (K, N)
        self.register_buffer("scales", scales.reshape(1, -1).float())  # (1, N)
        self.register_buffer("bias", bias)
        self._packed: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        rows = x.reshape(-1, shape[-1]).float()  # (M, K)
        if rows.shape[0] == 1:  # decode of one sequence: fbgemm's fused dynamic kernel, one scale = per token
            y = torch.ops.quantized.linear_dynamic(rows, self._fbgemm_weight(), False)
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1)
        quantized = torch.round(rows / row_scale).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * row_scale * self.scales  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _fbgemm_weight(self) -> Any:
        """fbgemm's prepacked copy of the same int8 weights (built once, on the engine thread)."""
        if self._packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(
                self.weight_t.t().contiguous(), self.scales.reshape(-1).double(), zero_points, 0
            )
            self._packed = torch.ops.quantized.linear_prepack(weight, self.bias)
        return self._packed

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float() * self.scales.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"


class Int8StaticLinear(Int8DynamicLinear):
    """W8A8 with one activation scale per layer, fixed from calibration (values beyond it are clipped)."""

    input_scale: torch.Tensor

    def __init__(
        self, weight_int8: torch.Tensor, scales: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__(weight_int8, scales, bias)
        self.register_buffer("input_scale", input_scale.reshape(()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        rows = x.reshape(-1, shape[-1]).float()  # (M, K)
        quantized = torch.round(rows / self.input_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * (self.input_scale * self.scales)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _is(value: Any, name: str) -> bool:
    return str(value).lower().endswith(name)


def _int8_activations(module: nn.Module) -> str | None:
    """For symmetric int8 per-channel weights: `none`, `token` (dynamic) or `tensor` (static) int8
    activations; None for any other scheme."""
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    acts = getattr(scheme, "input_activations", None)
    if weights is None or not (
        weights.num_bits == 8 and _is(weights.type, "int") and _is(weights.strategy, "channel") and weights.symmetric
    ):
        return None
    if acts is None:
        return "none"
    if acts.num_bits != 8 or not acts.symmetric:
        return None
    if _is(acts.strategy, "token") and acts.dynamic:
        return "token"
    if _is(acts.strategy, "tensor") and not acts.dynamic:
        return "tensor"
    return None


def _unpacked_int8(module: Any) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(int(d) for d in module.weight_shape)
    return unpack_from_int32(module.weight_packed.data, 8, shape).to(torch.int8)


def accelerate_compressed_linears(model: nn.Module) -> int:
    """Swap compressed-tensors int8 Linears for CPU-kernel modules; returns how many were swapped.

    W8A16 (`pack-quantized`) -> `Int8WeightOnlyLinear`; W8A8 (`int-quantized`) with per-token dynamic
    activations -> `Int8DynamicLinear`, with a calibrated per-layer scale -> `Int8StaticLinear`.
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            linear: Any = child
            bias = linear.bias.data if getattr(linear, "bias", None) is not None else None
            fast: nn.Module
            kind = _int8_activations(linear)
            int8_weight = getattr(linear, "weight", None) is not None and linear.weight.dtype == torch.int8
            if kind == "none" and hasattr(linear, "weight_packed"):
                fast = Int8WeightOnlyLinear(_unpacked_int8(linear), linear.weight_scale.data, bias)
            elif kind == "token" and int8_weight:
                fast = Int8DynamicLinear(linear.weight.data, linear.weight_scale.data, bias)
            elif kind == "tensor" and int8_weight:
                fast = Int8StaticLinear(linear.weight.data, linear.weight_scale.data, linear.input_scale.data, bias)
            else:
                continue
            setattr(parent, child_name, fast)
            replaced += 1
    return replaced


def is_compressed_tensors(config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) in {"compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS"}
