"""SmoothQuant: move activation outliers into the weights before quantizing activations to int8.

For a Linear fed by x, y = (x / s) @ (W * s).T for any per-input-channel s > 0. With
s = max|x|^alpha / max|W|^(1 - alpha), the activations lose their outlier channels and the weights
absorb them. The 1/s is folded into whatever produces x, so the float model is unchanged:
the RMSNorm before q/k/v and before gate/up, up_proj's rows before down_proj (x = act(gate) * up),
v_proj's rows before o_proj (shared across the query heads of a KV group), the final norm before lm_head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm


class SmoothingError(ValueError):
    """The model's architecture is not one the smoothing rules know."""


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


def _into_norm(norm: Any, linears: list[Any], act: torch.Tensor, alpha: float) -> None:
    weight_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)  # (K,)
    s = _scales(act, weight_max, alpha)
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


@torch.no_grad()
def smooth_llama(model: Any, maxima: dict[str, torch.Tensor], alpha: float = 0.5) -> int:
    """Apply SmoothQuant in place to a Llama-style decoder; returns the number of smoothed Linears."""
    config = model.config
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(
        hasattr(layer, name) for layer in layers for name in ("input_layernorm", "post_attention_layernorm")
    ):
        raise SmoothingError(f"smoothing supports Llama-style decoders, not {type(model).__name__}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    smoothed = 0
    for i, layer in enumerate(layers):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"model.layers.{i}."
        _into_norm(
            layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], maxima[prefix + "self_attn.q_proj"], alpha
        )
        _into_norm(
            layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], maxima[prefix + "mlp.gate_proj"], alpha
        )
        s = _scales(maxima[prefix + "mlp.down_proj"], mlp.down_proj.weight.abs().amax(dim=0), alpha)  # (I,)
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s[None, :])
        # o_proj input channel (h, d) is v_proj output channel (h // group, d): one scale per KV channel
        kv = config.num_key_value_heads
        act = maxima[prefix + "self_attn.o_proj"].reshape(kv, group, head_dim).amax(dim=1)  # (kv, D)
        w_max = attn.o_proj.weight.abs().amax(dim=0).reshape(kv, group, head_dim).amax(dim=1)  # (kv, D)
        s_kv = _scales(act, w_max, alpha)  # (kv, D)
        attn.v_proj.weight.div_(s_kv.reshape(-1)[:, None])
        attn.o_proj.weight.mul_(s_kv[:, None, :].expand(kv, group, head_dim).reshape(-1)[None, :])
        smoothed += 7
    head = model.get_output_embeddings()
    if "lm_head" in maxima and head is not None and not getattr(config, "tie_word_embeddings", False):
        _into_norm(model.model.norm, [head], maxima["lm_head"], alpha)
        smoothed += 1
    return smoothed
