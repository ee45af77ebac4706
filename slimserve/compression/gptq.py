"""GPTQ: group-wise integer weights chosen with second-order error feedback from calibration inputs.

Round-to-nearest rounds each weight on its own; GPTQ (Frantar et al., 2022) quantizes a layer's
columns one at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian H = 2 X^T X of the layer's calibration inputs, so that the layer's
*outputs* on real activations move as little as possible. Layers are processed in order, each fed the
outputs of the already-quantized layers before it (as the reference implementation does).

Written here rather than taken from llm-compressor, whose GPTQ is the well-kept one: its 0.14 release
pins transformers <= 5.17 and compressed-tensors 0.19 and pulls datasets/auto-round, and its GPTQ refuses
this model at group 128 (the hidden size 576 is not a multiple of 128). The result is written in the same
compressed-tensors format it would write, with compressed-tensors' own parameter rules
(`calculate_qparams`), so vLLM and transformers load it the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class IntGrid:
    """Asymmetric integer grid of `bits` bits, one (scale, zero point) per group of `group_size` columns."""

    bits: int = 4
    group_size: int = 128
    clip_search: bool = False
    """Shrink each group's range to the factor (1.0 down to 0.75) that minimises its squared rounding
    error, instead of always covering min..max."""

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def params(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero point (each (N,)) covering `columns` (N, g), as compressed-tensors computes them."""
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.utils import calculate_qparams

        args = QuantizationArgs(
            num_bits=self.bits, type="int", strategy="group", group_size=self.group_size, symmetric=False
        )
        low, high = columns.amin(dim=1, keepdim=True), columns.amax(dim=1, keepdim=True)
        scale, zero_point = calculate_qparams(low, high, args)
        if self.clip_search:
            best = self._error(columns, scale, zero_point)
            for factor in (0.95, 0.9, 0.85, 0.8, 0.75):
                s, z = calculate_qparams(low * factor, high * factor, args)
                error = self._error(columns, s, z)
                better = error < best
                scale, zero_point = torch.where(better, s, scale), torch.where(better, z, zero_point)
                best = torch.minimum(error, best)
        return scale.reshape(-1).float(), zero_point.reshape(-1).float()

    def _error(self, columns: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        scale, zero = scale.float(), zero.float()
        deq = (self.quantize(columns, scale, zero) - zero) * scale
        return ((deq - columns) ** 2).sum(dim=1, keepdim=True)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes of `w` (broadcast against scale/zero) on this grid."""
        return torch.clamp(torch.round(w / scale) + zero, self.qmin, self.qmax)


@dataclass
class QuantizedWeight:
    """Integer codes (N, K), scales and zero points (N, K / group), and the dequantized weight."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor
    dequantized: torch.Tensor


def group_size_for(in_features: int, requested: int, smallest: int = 32) -> int:
    """`requested` when it divides the layer's input size, else the largest halving of it that does.

    Formats and kernels (compressed-tensors, vLLM's Marlin, torch's int4 CPU kernel) need whole groups;
    the default teacher's hidden size 576 = 4.5 x 128, so its q/k/v/o/gate/up layers get groups of 64.
    """
    size = requested
    while size >= smallest:
        if in_features % size == 0:
            return size
        size //= 2
    raise ValueError(f"no group size between {smallest} and {requested} divides the input size {in_features}")


def round_to_nearest(weight: torch.Tensor, grid: IntGrid) -> QuantizedWeight:
    """The baseline: every group's min/max grid, every weight rounded on its own."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // grid.group_size, grid.group_size)
    scale, zero = grid.params(groups.reshape(-1, grid.group_size))
    scale, zero = scale.reshape(n, -1, 1), zero.reshape(n, -1, 1)
    codes = grid.quantize(groups, scale, zero)
    return QuantizedWeight(
        codes=codes.reshape(n, k).to(torch.int8),
        scales=scale.reshape(n, -1),
        zero_points=zero.reshape(n, -1),
        dequantized=((codes - zero) * scale).reshape(n, k),
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch ops on one thread, then restore the pool's size."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: IntGrid,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> QuantizedWeight:
    """Quantize `weight` (N, K) column by column with error feedback through the inverse of `hessian` (K, K).

    Follows the reference `fasterquant` (lazy block updates, Cholesky of the inverse Hessian, dampening
    of `damp` x the mean diagonal). With `act_order`, columns are visited in order of decreasing Hessian
    diagonal (the inputs with the most energy first) while every group keeps the grid fixed from the
    original weights beforehand ("static groups"), so the saved groups stay contiguous; without it, a
    group's grid is fixed from the error-updated weights when its first column is reached.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero carry no information
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g = grid.group_size
    scales = torch.zeros(n, k // g)
    zeros = torch.zeros(n, k // g)
    if act_order:
        for group in range(k // g):
            scales[:, group], zeros[:, group] = grid.params(w[:, group * g : (group + 1) * g])
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    block_size = max(block_size, g)
    codes = torch.zeros(k, n)
    w = w.t().contiguous()  # (K, N): a column of the weight is a contiguous row, updated in place below
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = w[start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        with one_thread():  # vectors of N floats: thread hand-offs cost more than they save
            for i in range(end - start):
                column = int(order[start + i])
                group = column // g
                if not act_order and column % g == 0:  # a new group: its grid from the weights as updated so far
                    scales[:, group], zeros[:, group] = grid.params(block[i : i + g].t())
                scale, zero = scales[:, group], zeros[:, group]
                q = grid.quantize(block[i], scale, zero)
                codes[column] = q
                error = (block[i] - (q - zero) * scale) / h_block[i, i]
                block[i:].addr_(h_block[i, i:], error, alpha=-1.0)
                errors[i] = error
        w[end:].addmm_(h_inv[start:end, end:].t(), errors, alpha=-1.0)
    codes = codes.t()

    dequantized = (codes - zeros.repeat_interleave(g, dim=1)) * scales.repeat_interleave(g, dim=1)
    return QuantizedWeight(codes.to(torch.int8), scales, zeros, dequantized)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList with `num_hidden_layers` entries)."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected {count} blocks)")


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """What every decoder block receives for one calibration sequence: block 0's hidden state and, per block,
    its other arguments as the model's own forward passes them.

    Each block keeps its own attention mask and position embeddings: Gemma 3 alternates sliding-window blocks
    (their own mask and RoPE base) with global ones, so block 0's arguments are wrong for half the others.
    """

    hidden: torch.Tensor
    """(1, T, hidden) input of block 0."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    """Per block: positional arguments after the hidden state, and keyword arguments without it."""

    def arguments(self, index: int, hidden: torch.Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Block `index`'s arguments with `hidden` as its input hidden state."""
        args, kwargs = self.calls[index]
        return (hidden, *args), kwargs


def layer_inputs(model: nn.Module, sequences: Sequence[torch.Tensor]) -> list[LayerInputs]:
    """Every block's arguments for each calibration sequence, caught from the model's own forward (which
    stops after the last block: the head over a large vocabulary is not needed)."""
    layers = decoder_layers(model)
    return [_caught(model, layers, ids) for ids in sequences]


def _caught(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor) -> LayerInputs:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    first: list[torch.Tensor] = []

    def catch(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = dict(kwargs)
        hidden = args[0] if args else rest.pop("hidden_states")
        if not calls:
            first.append(hidden)
        calls.append((tuple(args[1:]), rest))

    def stop(_module: nn.Module, _args: Any, _output: Any) -> None:
        raise _StopForward

    handles = [layer.register_forward_pre_hook(catch, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(stop))
    try:
        with contextlib.suppress(_StopForward):
            model(input_ids=ids.reshape(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(layers):
        raise ValueError(f"{type(model).__name__} ran {len(calls)} of its {len(layers)} blocks in its forward")
    return LayerInputs(first[0], calls)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _HessianAccumulator:
    """Running H = 2/n sum x x^T over every row a Linear receives."""

    def __init__(self, in_features: int) -> None:
        self.hessian = torch.zeros(in_features, in_features)
        self.rows = 0

    def __call__(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        total = self.rows + x.shape[0]
        self.hessian.mul_(self.rows / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


def input_hessians(
    block: nn.Module, targets: dict[str, nn.Linear], inputs: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Run `block` on its calibration inputs and return each target Linear's input Hessian."""
    accumulators = {name: _HessianAccumulator(linear.in_features) for name, linear in targets.items()}
    handles = [linear.register_forward_pre_hook(accumulators[name]) for name, linear in targets.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: accumulator.hessian for name, accumulator in accumulators.items()}


@torch.no_grad()
def quantize_layers_sequentially(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    plan: dict[str, IntGrid],
    calibrated: bool,
    damp: float = 0.01,
    act_order: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize every Linear named in `plan` (full module names -> grid), block by block.

    With `calibrated`, each block's Linears get GPTQ with Hessians from the block's inputs, which are the
    outputs of the blocks before it *after* their quantization; otherwise round-to-nearest. Each Linear's
    weight is replaced by its dequantized value in place; the codes and grids are returned for saving.
    """
    results: dict[str, QuantizedWeight] = {}
    module_names = {module: name for name, module in model.named_modules()}
    layers = decoder_layers(model)
    captured = layer_inputs(model, sequences) if calibrated else []
    hidden = [c.hidden for c in captured]
    for index, layer in enumerate(layers):
        targets = {module_names[m]: m for m in layer.modules() if isinstance(m, nn.Linear) and module_names[m] in plan}
        inputs = [c.arguments(index, h) for c, h in zip(captured, hidden, strict=True)]
        hessians = input_hessians(layer, targets, inputs) if calibrated else {}
        for name, linear in targets.items():
            grid = plan[name]
            result = (
                gptq(linear.weight, hessians[name], grid, damp, act_order=act_order)
                if calibrated
                else round_to_nearest(linear.weight, grid)
            )
            linear.weight.data.copy_(result.dequantized.to(linear.weight.dtype))
            results[name] = result
        if calibrated:  # the next block sees what this quantized block produces
            hidden = [_hidden(layer(*args, **kwargs)) for args, kwargs in inputs]
        if progress is not None:
            progress(f"block {index + 1}/{len(layers)}: {len(targets)} linears")
    missing = set(plan) - set(results)
    if missing:
        raise ValueError(f"Linears outside the decoder blocks cannot be quantized group-wise: {sorted(missing)}")
    return results
