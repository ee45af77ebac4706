"""Quantization-aware training: the forward pass sees the weights as the export will store them.

Each decoder Linear's weight is parametrised by its own round-to-nearest quantize-dequantize on exactly
the grid that `slimserve quantize --method int4-rtn --no-clip-search` (or `int8-weight`) writes, with a
straight-through estimator: the loss is computed with quantized weights, the gradient updates the float
weights as if rounding were the identity. Exporting afterwards reproduces the trained forward exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimserve.compression.gptq import IntGrid, decoder_layers, group_size_for, round_to_nearest

QAT_BITS = {"int4": 4, "int8": 8}
EXPORT_METHOD = {"int4": "int4-rtn", "int8": "int8-weight"}
"""The quantization stage method whose grid each QAT mode trains for."""


class FakeQuantize(nn.Module):
    """w -> w + (Q(w) - w).detach(): quantized values forward, identity gradient backward."""

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            quantized = self.quantize(weight.detach().float()).to(weight.dtype)
        return weight + (quantized - weight).detach()

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            return round_to_nearest(weight, IntGrid(4, self.group_size)).dequantized
        scale = (weight.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=1e-12)  # compressed-tensors int8 sym
        return torch.clamp(torch.round(weight / scale), -128, 127) * scale


def attach_fake_quantization(model: nn.Module, mode: str, group_size: int = 128) -> int:
    """Parametrise every Linear inside the decoder blocks; returns how many. Embeddings and head stay float."""
    if mode not in QAT_BITS:
        raise ValueError(f"unknown QAT mode {mode!r}; choose one of {', '.join(QAT_BITS)}")
    count = 0
    for module in decoder_layers(model).modules():
        if isinstance(module, nn.Linear):
            size = group_size_for(module.in_features, group_size) if mode == "int4" else module.in_features
            parametrize.register_parametrization(module, "weight", FakeQuantize(QAT_BITS[mode], size))
            count += 1
    return count


def detach_fake_quantization(model: nn.Module) -> int:
    """Remove the parametrisations, keeping the trained float weights (the export quantizes them)."""
    count = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            count += 1
    return count


def export_config(mode: str, group_size: int) -> dict[str, Any]:
    """Quantization-stage settings that reproduce the trained grid (`method_config`'s arguments; int8 rows
    have no group size)."""
    if mode == "int8":
        return {"method": EXPORT_METHOD[mode]}
    return {"method": EXPORT_METHOD[mode], "group_size": group_size, "clip_search": False}
