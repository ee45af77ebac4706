"""SmoothQuant: move activation outliers into the weights before quantizing activations to int8.

For a Linear fed by x, y = (x / s) @ (W * s).T for any per-input-channel s > 0. With
s = max|x|^alpha / max|W|^(1 - alpha), the activations lose their outlier channels and the weights
absorb them. The 1/s is folded into whatever produces x, so the float model is unchanged. What produces
each Linear's input depends on where the architecture puts its norms (`NormPlacement`):

- the norm before q/k/v (`input_layernorm`) and the norm before gate/up (Llama's `post_attention_layernorm`,
  Gemma 3's `pre_feedforward_layernorm`: Gemma's `post_attention_layernorm` normalises the attention
  *output* and feeds no Linear);
- v_proj's rows (and bias) before o_proj, one scale per KV channel shared by the query heads of its group;
- up_proj's rows (and bias) before down_proj (x = act(gate) * up);
- the final norm before an untied lm_head.

A norm computing x * w absorbs 1/s as w / s; Gemma's computes x * (1 + w), so it takes w' = (1 + w) / s - 1.
Phi-3 stores q/k/v and gate/up fused: they are smoothed as the one Linear they are, with v's and up's rows
located inside it. An architecture with no rules here is refused by name (`SmoothingError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


class SmoothingError(ValueError):
    """The model's architecture is not one the smoothing rules know, or smoothing changed its output."""


@dataclass(frozen=True)
class NormPlacement:
    """Where a decoder block's norms sit and how they scale: what SmoothQuant folds 1/s into."""

    mlp_norm: str = "post_attention_layernorm"
    """The norm whose output gate/up read."""
    unit_offset: bool = False
    """The norm multiplies by (1 + w) instead of w (Gemma)."""
    fused: bool = False
    """q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (Phi-3)."""


NORM_PLACEMENTS: dict[str, NormPlacement] = {
    "llama": NormPlacement(),
    "mistral": NormPlacement(),
    "qwen2": NormPlacement(),
    "phi3": NormPlacement(fused=True),
    "gemma3_text": NormPlacement(mlp_norm="pre_feedforward_layernorm", unit_offset=True),
}
"""Architectures (`config.model_type`) SmoothQuant knows, each checked to leave the float model unchanged
(tests/unit/compression/test_smoothing.py)."""


def placement_for(config: Any, architecture: str | None = None) -> NormPlacement:
    """The norm placement of this model's architecture, or a `SmoothingError` naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in NORM_PLACEMENTS:
        name = architecture or ", ".join(getattr(config, "architectures", None) or []) or "this model"
        raise SmoothingError(
            f"SmoothQuant has no rules for {name} (model_type {model_type!r}): where its norms sit decides what "
            f"absorbs the smoothing scales; supported: {', '.join(sorted(NORM_PLACEMENTS))}"
        )
    return NORM_PLACEMENTS[model_type]


@torch.no_grad()
def activation_maxima(model: nn.Module, input_ids: torch.Tensor, window: int = 512) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of every Linear over calibration tokens, shape (in_features,) each."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()  # (K,)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        starts = range(0, max(1, input_ids.numel() - 1), window)
        for start in tqdm(starts, desc="calibrating", unit="window", leave=False):
            model(input_ids[start : start + window].unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


@torch.no_grad()
def token_maxima(model: nn.Module, input_ids: torch.Tensor, window: int = 512) -> dict[str, torch.Tensor]:
    """Per-token max |x| of every Linear's input over calibration tokens, shape (tokens,) each.

    Static activation scales are chosen from these: one extreme token (attention-sink tokens reach
    hundreds) must not set the scale for all the others.
    """
    maxima: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=1).float()  # (T,)
            maxima.setdefault(name, []).append(x)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for start in tqdm(range(0, max(1, input_ids.numel() - 1), window), desc="calibrating", leave=False):
            model(input_ids[start : start + window].unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in maxima.items()}


def _scales(act: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return (act.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


UNIT_OFFSET_AMPLIFICATION = 2.0
"""Largest |w'| / |1 + w'| a (1 + w) norm is smoothed to: the variant stores w' in bf16, whose 8 bits are
relative to |w'|, so near w' = -1 the factor (1 + w') would keep few of them; capped at 2, its error stays
within two bf16 steps."""


def _into_norm(norm: Any, unit_offset: bool, s: torch.Tensor) -> torch.Tensor:
    """Divide the norm's output channels by s (capped for (1 + w) norms, see above); returns the s used."""
    weight = norm.weight
    if unit_offset:
        gain = 1.0 + weight.float()  # (K,)
        s = torch.minimum(s, gain.abs() * (1.0 + UNIT_OFFSET_AMPLIFICATION)).clamp(min=1e-5)  # |gain/s| >= 1/(1+cap)
        weight.copy_((gain / s - 1.0).to(weight.dtype))
    else:
        weight.div_(s.to(weight.dtype))
    return s


def _into_rows(linear: nn.Linear, rows: slice, s: torch.Tensor) -> None:
    """Divide the output channels `rows` of `linear` (weight rows and bias) by s."""
    linear.weight[rows].div_(s[:, None].to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias[rows].div_(s.to(linear.bias.dtype))


def _columns(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.mul_(s[None, :].to(linear.weight.dtype))


def _norm_pair(norm: Any, unit_offset: bool, linears: list[nn.Linear], act: torch.Tensor, alpha: float) -> None:
    weight_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)  # (K,)
    s = _into_norm(norm, unit_offset, _scales(act, weight_max, alpha))
    for lin in linears:
        _columns(lin, s)


def _value_pair(config: Any, v: nn.Linear, v_rows: slice, o: nn.Linear, act: torch.Tensor, alpha: float) -> None:
    """o_proj input channel (h, d) is v's output channel (h // group, d): one scale per KV channel."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv
    act_kv = act.reshape(kv, group, head_dim).amax(dim=1)  # (kv, D)
    w_max = o.weight.abs().amax(dim=0).reshape(kv, group, head_dim).amax(dim=1)  # (kv, D)
    s_kv = _scales(act_kv, w_max, alpha)  # (kv, D)
    _into_rows(v, v_rows, s_kv.reshape(-1))
    _columns(o, s_kv[:, None, :].expand(kv, group, head_dim).reshape(-1))


def _up_pair(up: nn.Linear, up_rows: slice, down: nn.Linear, act: torch.Tensor, alpha: float) -> None:
    s = _scales(act, down.weight.abs().amax(dim=0), alpha)  # (I,)
    _into_rows(up, up_rows, s)
    _columns(down, s)


def _decoder_layers(model: Any, placement: NormPlacement) -> Any:
    layers = getattr(getattr(model, "model", None), "layers", None)
    attention = ("qkv_proj",) if placement.fused else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_up_proj",) if placement.fused else ("gate_proj", "up_proj")
    needed = ["input_layernorm", placement.mlp_norm, *(f"self_attn.{n}" for n in (*attention, "o_proj"))]
    needed += [f"mlp.{n}" for n in (*mlp, "down_proj")]
    for layer in layers or []:
        missing = [n for n in needed if _get(layer, n) is None]
        if missing:
            raise SmoothingError(f"{type(layer).__name__} lacks {', '.join(missing)}: not the block the rules expect")
    if not layers:
        raise SmoothingError(f"cannot find the decoder layers of {type(model).__name__} at model.layers")
    return layers


def smoothable(model: Any) -> NormPlacement:
    """The model's norm placement if SmoothQuant can be applied to it; a `SmoothingError` naming it if not.
    Reads only the structure, so a skeleton on the meta device will do."""
    placement = placement_for(model.config, type(model).__name__)
    _decoder_layers(model, placement)
    return placement


def _get(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


@torch.no_grad()
def smooth_model(model: Any, maxima: dict[str, torch.Tensor], alpha: float = 0.5) -> int:
    """Apply SmoothQuant in place by the architecture's `NormPlacement`; returns the number of smoothed Linears.

    `maxima` are `activation_maxima` of this model. Raises `SmoothingError` naming the architecture when
    it has no rules.
    """
    config = model.config
    placement = placement_for(config, type(model).__name__)
    layers = _decoder_layers(model, placement)
    names = {module: name for name, module in model.named_modules()}
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    smoothed = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        mlp_norm = _get(layer, placement.mlp_norm)
        act = lambda linear: maxima[names[linear]]  # noqa: E731
        if placement.fused:
            _norm_pair(layer.input_layernorm, placement.unit_offset, [attn.qkv_proj], act(attn.qkv_proj), alpha)
            _norm_pair(mlp_norm, placement.unit_offset, [mlp.gate_up_proj], act(mlp.gate_up_proj), alpha)
            v, v_rows = attn.qkv_proj, slice((heads + kv) * head_dim, (heads + 2 * kv) * head_dim)
            up, up_rows = mlp.gate_up_proj, slice(mlp.down_proj.in_features, 2 * mlp.down_proj.in_features)
            smoothed += 4
        else:
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            _norm_pair(layer.input_layernorm, placement.unit_offset, qkv, act(attn.q_proj), alpha)
            _norm_pair(mlp_norm, placement.unit_offset, [mlp.gate_proj, mlp.up_proj], act(mlp.gate_proj), alpha)
            v, v_rows = attn.v_proj, slice(0, attn.v_proj.out_features)
            up, up_rows = mlp.up_proj, slice(0, mlp.up_proj.out_features)
            smoothed += 7
        _value_pair(config, v, v_rows, attn.o_proj, act(attn.o_proj), alpha)
        _up_pair(up, up_rows, mlp.down_proj, act(mlp.down_proj), alpha)
    head = model.get_output_embeddings()
    if (
        head is not None
        and head in names
        and names[head] in maxima
        and not getattr(config, "tie_word_embeddings", False)
    ):
        _norm_pair(model.model.norm, placement.unit_offset, [head], maxima[names[head]], alpha)
        smoothed += 1
    return smoothed


@torch.no_grad()
def check_unchanged(before: torch.Tensor, after: torch.Tensor, architecture: str, tolerance: float = 1e-3) -> None:
    """Smoothing is an identity on the float model: logits that moved by more than `tolerance` x their range
    mean a rule does not fit this architecture (fp32 rounding moves them by ~1e-6)."""
    moved = float((after.float() - before.float()).abs().max())
    scale = float(before.float().abs().max()) or 1.0
    if not moved <= tolerance * scale:
        raise SmoothingError(
            f"smoothing changed {architecture}'s float logits by {moved:.3g} (of {scale:.3g}): its rules do not fit "
            "this model"
        )
