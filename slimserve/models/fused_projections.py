"""One matmul where a decoder layer runs several on the same input: its query, key and value projections,
and its MLP's gate and up projections (vLLM's `QKVParallelLinear` and `MergedColumnParallelLinear`).

Why: decoding one token at a time on a few cores, a projection costs mostly its call, not its arithmetic
(`benchmarks/tools/fused_speed.py` times decode steps both ways). Joining the weights row-wise leaves each
output column's dot product as it was: the outputs of torch's int4/int8 CPU kernels are bitwise equal
(checked in the tests).

A fused model serves only: its projections have new names, so it is neither saved nor trained.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimserve.models.cpu_kernels import Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionKind:
    """How one family's attention differs from Llama's, as far as `FusedQKVAttention` must reproduce it."""

    sliding_window: str | None = None
    """Where its forward reads the window it passes to the attention function: `config` (Mistral, for every
    layer), `layer` (Qwen2, Gemma 3: the attention module's own, None on global layers), or None (Llama)."""
    qk_norm: bool = False
    """Queries and keys are RMS-normalised per head before the rotation (Gemma 3's q_norm/k_norm)."""


ATTENTION_KINDS = {
    "LlamaAttention": AttentionKind(),
    "MistralAttention": AttentionKind(sliding_window="config"),
    "Qwen2Attention": AttentionKind(sliding_window="layer"),
    "Gemma3Attention": AttentionKind(sliding_window="layer", qk_norm=True),
}
"""Attention modules whose forward `FusedQKVAttention` reproduces (checked bit for bit in the tests)."""

MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP"}
"""Gated MLPs computing down(act(gate(x)) * up(x)), which `FusedGateUpMLP` reproduces."""

ALREADY_FUSED = {"Phi3Attention", "Phi3MLP"}
"""Modules that store their projections joined (`qkv_proj`, `gate_up_proj`): nothing to fuse."""


def joined_linear(parts: list[nn.Module]) -> nn.Module | None:
    """One module whose output is the parts' outputs side by side (concatenated on the last dim), or None
    when they cannot be joined (different kinds, inputs or calibrated activation scales).

    Only torch's integer CPU kernels are joined. Float `nn.Linear`s are not: the fp32 teacher gained nothing
    and its fp32 GEMV rounded differently with the joined shape."""
    layers: list[Any] = list(parts)  # the kernels' buffers, read by kind below
    kind = type(layers[0])
    if any(type(p) is not kind for p in layers) or len({_in_features(p) for p in layers}) != 1:
        return None
    bias = _joined_bias(layers)
    if kind is Int8WeightOnlyLinear:
        return Int8WeightOnlyLinear(
            torch.cat([p.weight_int8 for p in layers]), torch.cat([p.scales for p in layers]), bias
        )
    if kind is Int8DynamicLinear:
        return Int8DynamicLinear(
            torch.cat([p.weight_t.t() for p in layers]),
            torch.cat([p.scales.reshape(-1) for p in layers]),
            bias,
        )
    if kind is Int8StaticLinear:
        scales = [p.input_scale for p in layers]
        if any(not torch.equal(s, scales[0]) for s in scales):
            return None
        return Int8StaticLinear(
            torch.cat([p.weight_t.t() for p in layers]),
            torch.cat([p.scales.reshape(-1) for p in layers]),
            scales[0],
            bias,
        )
    if kind is Int4WeightOnlyLinear:
        return Int4WeightOnlyLinear.stacked(layers, bias)
    return None


def _in_features(module: nn.Module) -> int:
    return int(getattr(module, "in_features", -1))


def _joined_bias(parts: list[Any]) -> torch.Tensor | None:
    """The parts' biases end to end (zeros for a part without one); None when none has one."""
    biases = [p.bias for p in parts]
    if all(b is None for b in biases):
        return None
    dtype = next(b for b in biases if b is not None).dtype
    pairs = zip(biases, parts, strict=True)
    return torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=dtype) for b, p in pairs])


class FusedGateUpMLP(nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)), with gate and up computed by one matmul."""

    act_fn: Any

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn: Any, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # (..., I) each
        return self.down_proj(self.act_fn(gate) * up)


class FusedQKVAttention(nn.Module):
    """transformers' attention (Llama, Mistral, Qwen2, Gemma 3) with its query, key and value projections
    computed by one matmul.

    The forward is the family's own with the three projections read from one output, Gemma's per-head
    query/key norms applied as it applies them, and the rotary embedding applied to queries and keys in one
    pass (they are adjacent in that output): the same arithmetic, element for element. The cache update and
    the attention function (`config._attn_implementation`, else the family's eager one) are transformers'.
    """

    config: Any
    head_dim: int
    o_proj: Any
    qkv_proj: Any

    def __init__(self, attention: Any, qkv_proj: nn.Module, kind: AttentionKind | None = None) -> None:
        super().__init__()
        kind = kind or ATTENTION_KINDS[type(attention).__name__]
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout"):
            setattr(self, name, getattr(attention, name))
        self.is_causal = attention.is_causal
        self.qkv_proj, self.o_proj = qkv_proj, attention.o_proj
        self.q_norm = attention.q_norm if kind.qk_norm else None
        self.k_norm = attention.k_norm if kind.qk_norm else None
        self.window: dict[str, Any] = {}
        """The `sliding_window` argument the family passes to the attention function, if it passes one."""
        if kind.sliding_window == "config":
            self.window = {"sliding_window": getattr(self.config, "sliding_window", None)}
        elif kind.sliding_window == "layer":
            self.window = {"sliding_window": attention.sliding_window}
        self.eager = sys.modules[type(attention).__module__].eager_attention_forward
        self.heads, self.kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        self.qk_size = (self.heads + self.kv_heads) * self.head_dim
        """Queries and keys: the first columns of the joined output; values follow."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        input_shape = hidden_states.shape[:-1]  # (B, T)
        qkv = self.qkv_proj(hidden_states)  # (B, T, (heads + 2 kv heads) * D)
        qk = qkv[..., : self.qk_size].view(*input_shape, self.heads + self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # per head, in the (B, heads, T, D) layout
            q, k = qk.split([self.heads, self.kv_heads], dim=-2)
            q, k = self.q_norm(q.transpose(1, 2)).transpose(1, 2), self.k_norm(k.transpose(1, 2)).transpose(1, 2)
            qk = torch.cat([q, k], dim=-2)
        # queries and keys sit side by side in the output: one rotation turns both
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)  # (B, T, 1, D)
        qk = qk * cos + _rotate_half(qk) * sin
        query, key = qk.transpose(1, 2).split([self.heads, self.kv_heads], dim=1)  # (B, heads | kv heads, T, D)
        value = qkv[..., self.qk_size :].view(*input_shape, self.kv_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self.window,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama `rotate_half`: (x1, x2) -> (-x2, x1) over the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class FusionReport:
    """What `fuse_projections` did: modules replaced, and the attention/MLP classes it left as they were."""

    fused: int = 0
    already_fused: set[str] = field(default_factory=set)
    """Classes that store their projections joined already (Phi-3)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Class name -> why its projections were left apart."""


def fuse_projections(model: nn.Module) -> FusionReport:
    """Join each decoder layer's q/k/v and gate/up projections where the layer is of a known kind; attention
    and MLP modules of other kinds stay as they are, named in the report and the log."""
    report = FusionReport()
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            child: Any = module
            fused: nn.Module | None = None
            kind = type(child).__name__
            if kind in ALREADY_FUSED:
                report.already_fused.add(kind)
                continue
            if kind in ATTENTION_KINDS:
                qkv = joined_linear([child.q_proj, child.k_proj, child.v_proj])
                fused = FusedQKVAttention(child, qkv) if qkv is not None else None
            elif kind in MLP_CLASSES:
                gate_up = joined_linear([child.gate_proj, child.up_proj])
                size = int(getattr(child.gate_proj, "out_features", 0))
                fused = FusedGateUpMLP(gate_up, child.down_proj, child.act_fn, size) if gate_up is not None else None
            elif name in ("self_attn", "mlp"):
                report.skipped[kind] = "no fused forward for this class: its architecture is not covered"
                continue
            else:
                continue
            if fused is None:
                report.skipped[kind] = (
                    "its projections cannot be joined exactly: float (no gain), of different kernels or "
                    "calibrations, or int4 parts that split a packing block"
                )
                continue
            fused.train(child.training)
            setattr(parent, name, fused)
            report.fused += 1
    for kind, reason in sorted(report.skipped.items()):
        log.info("fused projections: %s left apart: %s", kind, reason)
    return report
