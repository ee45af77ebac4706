"""Students cut from the teacher: fewer decoder blocks and optionally narrower MLPs, teacher-initialised.

Which blocks to drop is measured, not guessed: a block whose output hidden state is nearly its input
(cosine close to 1 on calibration text, ShortGPT's "block influence") changes little and goes first.
MLP channels are ranked by their mean absolute activation (Minitron's activation-based importance).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimserve.compression.gptq import decoder_layers, layer_inputs


class StudentError(ValueError):
    """A student that cannot be built from this teacher."""


@dataclass
class StudentSpec:
    """How to cut a student from the teacher."""

    layers: int | None = None
    """Decoder blocks kept (the most influential ones, in their original order); default: all."""
    keep_layers: list[int] | None = None
    """Explicit block indices to keep instead of measuring (overrides `layers`)."""
    mlp_ratio: float = 1.0
    """Share of MLP channels kept in every block (by activation importance)."""
    calibration_tokens: int = 4096
    """Tokens of calibration text used to measure importance."""

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise StudentError(f"a student needs at least one layer, got {self.layers}")
        if not 0.0 < self.mlp_ratio <= 1.0:
            raise StudentError(f"mlp_ratio must be in (0, 1], got {self.mlp_ratio}")


@torch.no_grad()
def block_influence(model: nn.Module, sequences: list[torch.Tensor]) -> list[float]:
    """Per block: mean over tokens of 1 - cos(input hidden state, output hidden state). Larger = keep.

    Each block runs with its own mask and position embeddings (`layer_inputs`)."""
    layers = decoder_layers(model)
    scores = [0.0] * len(layers)
    tokens = 0
    for captured in layer_inputs(model, sequences):
        hidden = captured.hidden
        for index, layer in enumerate(layers):
            args, kwargs = captured.arguments(index, hidden)
            out = layer(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)
            scores[index] += float((1 - cos).sum())
            hidden = out
        tokens += int(hidden.shape[0] * hidden.shape[1])
    return [score / tokens for score in scores]


@torch.no_grad()
def mlp_channel_importance(model: nn.Module, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per block: mean |act(gate(x)) * up(x)| of each MLP channel, the input of `down_proj`."""
    sums: list[torch.Tensor] = []
    handles = []
    for index, layer in enumerate(decoder_layers(model)):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down, nn.Linear):
            raise StudentError(
                f"width pruning needs gated MLPs (mlp.gate_proj/up_proj or gate_up_proj, down_proj); "
                f"{type(model).__name__} has {type(getattr(layer, 'mlp', None)).__name__}"
            )
        sums.append(torch.zeros(down.in_features))

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], index: int = index) -> None:
            sums[index] += args[0].reshape(-1, args[0].shape[-1]).abs().float().sum(dim=0)

        handles.append(down.register_forward_pre_hook(hook))
    try:
        for ids in sequences:
            model(input_ids=ids.reshape(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def choose_layers(influence: list[float], count: int) -> list[int]:
    """The `count` most influential blocks, in model order; the first and last block are always kept
    (dropping either is catastrophic on every model we measured)."""
    total = len(influence)
    if count > total:
        raise StudentError(f"the student cannot have more layers ({count}) than the teacher ({total})")
    if count < 2 or count == total:
        return list(range(total))[:count] if count < 2 else list(range(total))
    middle = sorted(range(1, total - 1), key=lambda i: influence[i], reverse=True)[: count - 2]
    return sorted([0, total - 1, *middle])


def build_student(
    teacher: Any, spec: StudentSpec, sequences: list[torch.Tensor] | None = None
) -> tuple[Any, dict[str, Any]]:
    """A new model with the teacher's embeddings, head, final norm and the chosen blocks (copied).

    Returns the student and a report of what was measured and kept.
    """
    config = teacher.config
    total = int(config.num_hidden_layers)
    report: dict[str, Any] = {"teacher_layers": total}
    if spec.keep_layers is not None:
        keep = sorted(set(spec.keep_layers))
        if not keep or keep[0] < 0 or keep[-1] >= total:
            raise StudentError(f"keep_layers must be block indices in 0..{total - 1}, got {spec.keep_layers}")
    elif spec.layers is not None and spec.layers != total:
        if spec.layers > total:
            raise StudentError(f"the student cannot have more layers ({spec.layers}) than the teacher ({total})")
        if not sequences:
            raise StudentError("choosing layers by importance needs calibration text")
        influence = block_influence(teacher, sequences)
        keep = choose_layers(influence, spec.layers)
        report["block_influence"] = [round(v, 5) for v in influence]
    else:
        keep = list(range(total))
    report["kept_layers"] = keep

    student: Any = copy.deepcopy(teacher)
    layers = decoder_layers(student)
    kept_modules = nn.ModuleList([layers[i] for i in keep])
    parent = next(m for m in student.modules() if any(child is layers for child in m.children()))
    attribute = next(name for name, child in parent.named_children() if child is layers)
    setattr(parent, attribute, kept_modules)
    for new_index, layer in enumerate(kept_modules):
        for module in (layer, getattr(layer, "self_attn", None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]

    if spec.mlp_ratio < 1.0:
        if not sequences:
            raise StudentError("width pruning needs calibration text")
        importance = mlp_channel_importance(student, sequences)
        width = max(1, round(student.config.intermediate_size * spec.mlp_ratio))
        for layer, scores in zip(kept_modules, importance, strict=True):
            _prune_mlp(layer.mlp, torch.sort(torch.topk(scores, width).indices).values)
        student.config.intermediate_size = width
        report["intermediate_size"] = width
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()
    report["parameters"] = sum(p.numel() for p in student.parameters())
    report["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    return student, report


def _rows(old: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None)
    new.weight.data = old.weight.data[rows].clone()
    if old.bias is not None:
        new.bias.data = old.bias.data[rows].clone()
    return new


def _prune_mlp(mlp: Any, channels: torch.Tensor) -> None:
    """Keep `channels` of a gated MLP: rows of gate and up (or of both halves of Phi-3's fused gate_up_proj),
    columns of down."""
    old_down = mlp.down_proj
    if hasattr(mlp, "gate_up_proj"):  # rows [0, I) gate, [I, 2I) up
        mlp.gate_up_proj = _rows(mlp.gate_up_proj, torch.cat([channels, channels + old_down.in_features]))
    else:
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, channels), _rows(mlp.up_proj, channels)
    down = nn.Linear(len(channels), old_down.out_features, bias=old_down.bias is not None)
    down.weight.data = old_down.weight.data[:, channels].clone()
    if old_down.bias is not None:
        down.bias.data = old_down.bias.data.clone()
    mlp.down_proj = down
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)
