"""Integer weights (and activations) written in compressed-tensors' formats, which vLLM, transformers and
slimserve's CPU kernels all load: round-to-nearest int8 (W8A16, or W8A8 after SmoothQuant) and group-wise
int4 (GPTQ or round-to-nearest)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slimserve.compression.quantize_config import (
    CALIBRATION_SEQUENCE,
    GPTQConfig,
    Int4Config,
    QuantizationError,
    QuantizeConfig,
    W8A8DynamicConfig,
    W8A8StaticConfig,
    calibration_ids,
    require_linears,
)
from slimserve.models.loader import parse_dtype
from slimserve.models.registry import RegisteredVariant

SMOOTHING_PROBE_TOKENS = 64
"""Tokens on which the smoothed float model must still give the logits it gave before (`check_unchanged`)."""


@dataclass
class CompressedTensorsRTN:
    """Round-to-nearest integer weights written in compressed-tensors' `pack-quantized` format.

    `int8-weight` is W8A16: symmetric int8 per output channel, activations stay bf16. vLLM and
    transformers load the directory as is; slimserve's loader runs it with torch's fused int8 CPU kernel.
    """

    name: str
    bits: int
    activations: str = "none"
    """`none` (W8A16), `dynamic` (W8A8, a scale per token at run time) or `static` (W8A8, one scale per
    layer fixed from calibration); both W8A8 kinds are smoothed first (SmoothQuant)."""
    config: type[QuantizeConfig] = QuantizeConfig
    """`QuantizeConfig` for W8A16; `W8A8DynamicConfig` / `W8A8StaticConfig` (calibration, smoothing)."""
    runtimes: list[str] = field(default_factory=lambda: ["transformers", "vllm", "slimserve-cpu-kernels"])

    def scheme(self, config: QuantizeConfig) -> Any:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=self.bits, type="int", strategy="channel", symmetric=True, dynamic=False)
        activations = None
        if self.activations == "dynamic":
            activations = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
        elif self.activations == "static":
            activations = QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)

    def check(self, model: Any, config: QuantizeConfig) -> None:
        require_linears(model, self.name)
        if self.activations != "none":
            from slimserve.compression.smoothing import SmoothingError, smoothable

            try:
                smoothable(model)
            except SmoothingError as exc:
                raise QuantizationError(f"{self.name} smooths activations first, and {exc}") from exc

    def smooth(
        self, model: Any, source: RegisteredVariant, config: W8A8DynamicConfig
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """SmoothQuant in place; returns provenance and each Linear's input maxima after smoothing."""
        from transformers import AutoTokenizer

        from slimserve.compression.smoothing import (
            SmoothingError,
            activation_maxima,
            check_unchanged,
            smooth_model,
            token_maxima,
        )

        ids = calibration_ids(AutoTokenizer.from_pretrained(source.path), config)
        probe = ids[:SMOOTHING_PROBE_TOKENS].unsqueeze(0)
        alpha = config.smoothing_alpha
        try:
            with torch.no_grad():
                before = model(probe).logits
                smoothed = smooth_model(model, activation_maxima(model, ids), alpha=alpha)
                check_unchanged(before, model(probe).logits, type(model).__name__)
        except SmoothingError as exc:
            raise QuantizationError(f"{self.name}: {exc}") from exc
        maxima = token_maxima(model, ids) if self.activations == "static" else {}
        return {
            "smoothquant": {
                "alpha": alpha,
                "calibration_tokens": int(ids.numel()),
                "smoothed_linears": smoothed,
            }
        }, maxima

    def apply(self, source: RegisteredVariant, staging: Path, config: QuantizeConfig) -> dict[str, Any]:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
        from compressed_tensors.quantization.utils import calculate_qparams
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        untie_head_if_quantized(model, config)
        details: dict[str, Any] = {}
        input_maxima: dict[str, torch.Tensor] = {}
        if isinstance(config, W8A8DynamicConfig):
            details, input_maxima = self.smooth(model, source, config)
        scheme = self.scheme(config)
        apply_quantization_config(
            model,
            QuantizationConfig(
                config_groups={"group_0": scheme},
                ignore=config.kept,
                quantization_status=QuantizationStatus.INITIALIZED,
            ),
        )
        quantized = 0
        with torch.no_grad():
            module: Any
            for name, module in model.named_modules():
                if getattr(module, "quantization_scheme", None) is None or not hasattr(module, "weight_scale"):
                    continue
                if hasattr(module, "input_scale") and isinstance(config, W8A8StaticConfig):  # one scale per layer
                    clip = torch.quantile(input_maxima[name], config.activation_quantile)
                    module.input_scale.fill_(float(clip.clamp(min=1e-8)) / 127)
                weight = module.weight  # (N, K)
                scale, zero_point = calculate_qparams(
                    weight.amin(dim=1, keepdim=True),
                    weight.amax(dim=1, keepdim=True),
                    module.quantization_scheme.weights,
                )
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
                quantized += 1
        if quantized == 0:
            raise QuantizationError(f"{source.name!r} has no Linear layers that {self.name} can quantize")
        quant_format = "pack-quantized" if self.activations == "none" else "int-quantized"
        save_compressed(model, staging, config, quant_format)
        return {"library": "compressed-tensors", "format": quant_format, "quantized_linears": quantized, **details}


@dataclass
class GroupwiseInt4:
    """W4A16: asymmetric int4 weights with a scale and zero point per group of input columns.

    `int4-gptq` chooses the integers with GPTQ on calibration text (compression/gptq.py); `int4-rtn` rounds
    to nearest on the same grid, the baseline it must beat. Saved in compressed-tensors' `pack-quantized`
    format (vLLM: Marlin/Machete W4A16; slimserve: torch's int4 CPU kernel). A head that is not kept is
    stored in int8 per row.
    """

    name: str
    calibrated: bool
    bits: int = 4
    config: type[QuantizeConfig] = Int4Config
    """`GPTQConfig` where `calibrated`, else `Int4Config`."""
    runtimes: list[str] = field(default_factory=lambda: ["transformers", "vllm", "slimserve-cpu-kernels"])

    def check(self, model: Any, config: Int4Config) -> None:
        from slimserve.compression.gptq import decoder_layers, group_size_for

        try:
            linears = [m for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear)]
            for linear in linears:
                group_size_for(linear.in_features, config.group_size)
        except ValueError as exc:
            raise QuantizationError(f"{self.name}: {exc}") from exc
        if not linears:
            raise QuantizationError(f"{type(model).__name__} has no Linear layers that {self.name} can quantize")

    def apply(self, source: RegisteredVariant, staging: Path, config: Int4Config) -> dict[str, Any]:
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
            QuantizationStatus,
            apply_quantization_config,
        )
        from compressed_tensors.quantization.utils import calculate_qparams
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slimserve.compression.gptq import IntGrid, decoder_layers, group_size_for, quantize_layers_sequentially

        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        model.eval()
        untie_head_if_quantized(model, config)
        try:
            blocks = decoder_layers(model)
        except ValueError as exc:
            raise QuantizationError(f"{self.name}: {exc}") from exc
        names = {module: name for name, module in model.named_modules()}
        plan: dict[str, IntGrid] = {}
        for module in blocks.modules():
            name = names[module]
            if isinstance(module, torch.nn.Linear) and not any(name.endswith(k) for k in config.kept):
                try:
                    size = group_size_for(module.in_features, config.group_size)
                    plan[name] = IntGrid(4, size, clip_search=config.clip_search)
                except ValueError as exc:
                    raise QuantizationError(f"{self.name}: {name}: {exc}") from exc
        if not plan:
            raise QuantizationError(f"{source.name!r} has no Linear layers that {self.name} can quantize")

        sequences: list[torch.Tensor] = []
        gptq: dict[str, Any] = {}
        if isinstance(config, GPTQConfig):
            sequences = list(
                calibration_ids(AutoTokenizer.from_pretrained(source.path), config).split(CALIBRATION_SEQUENCE)
            )
            gptq = {"damp": config.damp, "act_order": config.act_order}
        bar = tqdm(total=len(blocks), desc=f"{self.name} {source.name}", unit="block", leave=False)
        try:
            results = quantize_layers_sequentially(
                model,
                sequences,
                plan,
                calibrated=self.calibrated,
                **gptq,
                progress=lambda _message: bar.update(1),
            )
        finally:
            bar.close()

        groups: dict[str, Any] = {}
        for size in sorted({grid.group_size for grid in plan.values()}, reverse=True):
            weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=size, symmetric=False)
            targets = sorted(name for name, grid in plan.items() if grid.group_size == size)
            groups[f"int4_group{size}"] = QuantizationScheme(targets=targets, weights=weights)
        head = model.get_output_embeddings()
        head_quantized = head is not None and "lm_head" not in config.kept
        if head_quantized:
            groups["int8_head"] = int8_head_scheme(targets=[names[head]])
        apply_quantization_config(
            model, QuantizationConfig(config_groups=groups, quantization_status=QuantizationStatus.INITIALIZED)
        )
        with torch.no_grad():
            for name, result in results.items():
                target: Any = model.get_submodule(name)
                target.weight_scale.copy_(result.scales.reshape(target.weight_scale.shape))
                target.weight_zero_point.copy_(result.zero_points.reshape(target.weight_zero_point.shape))
            if head_quantized:
                h: Any = head
                scale, _ = calculate_qparams(
                    h.weight.amin(dim=1, keepdim=True),
                    h.weight.amax(dim=1, keepdim=True),
                    h.quantization_scheme.weights,
                )
                h.weight_scale.copy_(scale.reshape(h.weight_scale.shape))
        save_compressed(model, staging, config, "pack-quantized")
        group_sizes: dict[str, int] = {}
        for grid in plan.values():
            group_sizes[str(grid.group_size)] = group_sizes.get(str(grid.group_size), 0) + 1
        return {
            "library": "compressed-tensors",
            "format": "pack-quantized",
            "algorithm": "gptq" if self.calibrated else "round-to-nearest",
            "quantized_linears": len(results),
            "linears_by_group_size": group_sizes,
            "head": "int8 per row" if head_quantized else "kept",
            "calibration_tokens": int(sum(len(s) for s in sequences)),
        }


def int8_head_scheme(targets: list[str] | None = None) -> Any:
    """W8A16, symmetric int8 per output row: for the output head (and a shared int8 embedding table)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
    return QuantizationScheme(targets=targets or ["lm_head"], weights=weights)


def untie_head_if_quantized(model: Any, config: QuantizeConfig) -> None:
    """A quantized head cannot share its weight with a float embedding table: give it its own copy.

    With `embedding="int8"` the head stays the only copy; the float embedding is dropped at save time.
    """
    head = model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if config.embedding == "int8" and not tied:
        raise QuantizationError("--embedding int8 needs a model whose embedding and output head are tied")
    if "lm_head" not in config.kept and head is not None and tied:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def save_compressed(model: Any, staging: Path, config: QuantizeConfig, quant_format: str) -> None:
    """Compress the calibrated model, keep its float tensors in `compute_dtype`, write it with its config."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=quant_format)
    compressor.compress_model(model)
    storage = parse_dtype(config.compute_dtype)
    for name, param in model.named_parameters():  # embeddings and norms, kept in float
        if param.is_floating_point() and not name.endswith(("weight_scale", "weight_zero_point")):
            param.data = param.data.to(storage)
    model.config.dtype = storage
    model.save_pretrained(staging)
    compressor.update_config(staging)
    if config.embedding == "int8":
        drop_input_embedding(model, staging)


def drop_input_embedding(model: Any, staging: Path) -> None:
    """Remove the float embedding table from the saved weights: the int8 head is loaded in its place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    embedding = model.get_input_embeddings()
    key = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    for file in staging.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            if key not in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                continue
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != key}  # noqa: SIM118
        save_file(tensors, file, metadata=metadata)
    index = staging / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data.get("weight_map", {}).pop(key, None)
        index.write_text(json.dumps(data, indent=2))
