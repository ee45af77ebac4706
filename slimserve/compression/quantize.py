"""Post-training quantization of a variant into a new, registered variant directory.

Each method is one object with one entry point (`apply`) that writes a loadable model directory; the
glue here validates inputs first, writes into a hidden staging directory, and renames it into the
registry only when everything succeeded, so a failure never leaves a half-written variant behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from slimserve.compression.data import read_text, train_texts
from slimserve.models.cpu_kernels import TIED_INT8_EMBEDDING
from slimserve.models.loader import parse_dtype
from slimserve.models.manifest import VariantManifest, weights_size_bytes
from slimserve.models.registry import RegisteredVariant, VariantRegistry
from slimserve.models.runtimes import with_vllm_cpu


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured; raised before any file is written."""


@dataclass
class QuantizeConfig:
    """One post-training quantization run."""

    method: str
    """One of `METHODS` (see `slimserve quantize --help`)."""
    name: str | None = None
    """Registry name of the result; default `<source>-<method>`."""
    calibration: str | None = None
    """Text file for calibration; default: the training split of Python's `pydoc_data` topics."""
    calibration_tokens: int = 8192
    """Tokens of calibration text used by methods that calibrate."""
    group_size: int = 128
    """Weights per quantization group for group-wise 4-bit methods (halved for layers it does not divide)."""
    keep: list[str] | None = None
    """Module names kept in high precision; default `lm_head` (none with `embedding="int8"`)."""
    embedding: str = "float"
    """`float`: the embedding table stays in `compute_dtype` (tied to a float head, the portable form);
    `int8`: one int8 table with a scale per row serves as both the embedding and the output head (a
    quarter of the fp32 size; only slimserve's loader reads it)."""
    damp: float = 0.01
    """GPTQ: Hessian dampening as a fraction of its mean diagonal."""
    act_order: bool = True
    """GPTQ: visit columns by decreasing Hessian diagonal, with each group's grid fixed beforehand (on the
    default teacher at group 128/64: ppl +8.6% vs +14.2% in column order, 2048 held-out tokens)."""
    clip_search: bool = True
    """int4: per group, shrink the min..max range (down to 0.75x) where that lowers the rounding error."""
    compute_dtype: str = "bf16"
    """Dtype the dequantized matmuls run in."""
    smoothing_alpha: float | None = None
    """SmoothQuant migration strength (0: none into the weights, 1: all); default per method: 0.5 for
    int8-dynamic, 0.75 for int8-static (measured best of 0.3-0.9 on the default teacher)."""
    activation_quantile: float = 1.0
    """int8-static: the layer's scale covers this quantile of per-token input maxima; larger values clip."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        if self.group_size not in (32, 64, 128, 256):
            raise QuantizationError(f"--group-size must be 32, 64, 128 or 256, got {self.group_size}")
        if self.calibration_tokens < 256:
            raise QuantizationError(f"--calibration-tokens must be at least 256, got {self.calibration_tokens}")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise QuantizationError(f"calibration file {self.calibration} does not exist")
        if not 0.5 <= self.activation_quantile <= 1.0:
            raise QuantizationError(f"--activation-quantile must be in [0.5, 1], got {self.activation_quantile}")
        if self.smoothing_alpha is not None and not 0.0 < self.smoothing_alpha < 1.0:
            raise QuantizationError(f"--smoothing-alpha must be in (0, 1), got {self.smoothing_alpha}")
        if self.embedding not in ("float", "int8"):
            raise QuantizationError(f"--embedding must be 'float' or 'int8', got {self.embedding!r}")
        if self.embedding == "int8" and "lm_head" in (self.keep or []):
            raise QuantizationError("--embedding int8 stores the output head in int8: do not --keep lm_head")
        if not 0.0 < self.damp < 1.0:
            raise QuantizationError(f"--damp must be in (0, 1), got {self.damp}")
        parse_dtype(self.compute_dtype)

    @property
    def kept(self) -> list[str]:
        """Module names left in high precision."""
        if self.keep is not None:
            return list(self.keep)
        return ["lm_head"] if self.embedding == "float" else []


class QuantMethod(Protocol):
    name: str
    bits: int
    runtimes: list[str]
    """Runtimes that load what `apply` writes."""

    def apply(self, source: RegisteredVariant, staging: Path, config: QuantizeConfig) -> dict[str, Any]:
        """Write the quantized model (weights + config) into `staging`; return provenance details."""
        ...


@dataclass
class BitsAndBytes:
    """LLM.int8 and 4-bit NF4/FP4 through bitsandbytes, as transformers' `BitsAndBytesConfig` applies them.

    Round-to-nearest, no calibration. The saved directory carries its `quantization_config`, so both
    transformers and vLLM load it as is.
    """

    name: str
    bits: int
    quant_type: str | None = None
    runtimes: list[str] = field(default_factory=lambda: ["transformers", "vllm"])

    def apply(self, source: RegisteredVariant, staging: Path, config: QuantizeConfig) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        compute = parse_dtype(config.compute_dtype)
        if self.bits == 8:
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=config.kept)
        else:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_compute_dtype=compute,
                llm_int8_skip_modules=config.kept,
            )
        model = AutoModelForCausalLM.from_pretrained(
            source.path, quantization_config=bnb, dtype=compute, device_map="cpu"
        )
        model.save_pretrained(staging, safe_serialization=True)
        return {"library": "bitsandbytes", "quantization_config": bnb.to_dict()}


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
    default_alpha: float = 0.5
    """SmoothQuant strength when the config gives none."""
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

    def smooth(
        self, model: Any, source: RegisteredVariant, config: QuantizeConfig
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """SmoothQuant in place; returns provenance and each Linear's input maxima after smoothing."""
        from transformers import AutoTokenizer

        from slimserve.compression.smoothing import SmoothingError, activation_maxima, smooth_llama, token_maxima

        tokenizer = AutoTokenizer.from_pretrained(source.path)
        ids = tokenizer(calibration_text(config), return_tensors="pt")["input_ids"][0, : config.calibration_tokens]
        try:
            alpha = config.smoothing_alpha if config.smoothing_alpha is not None else self.default_alpha
            smoothed = smooth_llama(model, activation_maxima(model, ids), alpha=alpha)
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
        if self.activations != "none":
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
                if hasattr(module, "input_scale"):  # static W8A8: one symmetric scale per layer
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
    runtimes: list[str] = field(default_factory=lambda: ["transformers", "vllm", "slimserve-cpu-kernels"])

    def apply(self, source: RegisteredVariant, staging: Path, config: QuantizeConfig) -> dict[str, Any]:
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
        if self.calibrated:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
            ids = tokenizer(calibration_text(config), return_tensors="pt")["input_ids"][0, : config.calibration_tokens]
            sequences = list(ids.split(CALIBRATION_SEQUENCE))
        bar = tqdm(total=len(blocks), desc=f"{self.name} {source.name}", unit="block", leave=False)
        try:
            results = quantize_layers_sequentially(
                model,
                sequences,
                plan,
                calibrated=self.calibrated,
                damp=config.damp,
                act_order=config.act_order,
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


CALIBRATION_SEQUENCE = 512
"""Tokens per calibration sequence fed through the model."""


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


METHODS: dict[str, QuantMethod] = {
    "int8-weight": CompressedTensorsRTN("int8-weight", 8),
    "int8-dynamic": CompressedTensorsRTN("int8-dynamic", 8, activations="dynamic"),
    "int8-static": CompressedTensorsRTN("int8-static", 8, activations="static", default_alpha=0.75),
    "int4-gptq": GroupwiseInt4("int4-gptq", calibrated=True),
    "int4-rtn": GroupwiseInt4("int4-rtn", calibrated=False),
    "bnb-int8": BitsAndBytes("bnb-int8", 8),
    "bnb-nf4": BitsAndBytes("bnb-nf4", 4, "nf4"),
    "bnb-fp4": BitsAndBytes("bnb-fp4", 4, "fp4"),
}


INT8_EMBEDDING_METHODS = ("int8-weight", "int4-gptq", "int4-rtn")
"""Methods whose output head is weight-only int8 per row, so it can double as the embedding table."""


def calibration_text(config: QuantizeConfig) -> str:
    return read_text(config.calibration) if config.calibration else "\n\n".join(train_texts())


def quantize_variant(source_ref: str, config: QuantizeConfig, registry: VariantRegistry | None = None) -> Path:
    """Quantize `source_ref` with `config.method`; returns the registered variant directory."""
    registry = registry or VariantRegistry()
    source = registry.resolve(source_ref)
    if source.manifest.bits < 16 or source.manifest.method.startswith(("bnb-", "int")):
        raise QuantizationError(
            f"{source.name!r} is already quantized ({source.manifest.method}, {source.manifest.bits} bits); "
            "quantize its float parent instead"
        )
    method = METHODS[config.method]
    if config.embedding == "int8" and config.method not in INT8_EMBEDDING_METHODS:
        raise QuantizationError(
            f"--embedding int8 needs a weight-only method ({', '.join(INT8_EMBEDDING_METHODS)}), not {config.method}"
        )
    name = config.name or f"{source.name}-{config.method}"
    target = registry.variants_dir / name
    if target.exists():
        raise QuantizationError(f"variant {name!r} already exists at {target}; choose another --name")
    registry.variants_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=registry.variants_dir, prefix=f".{name}.") as tmp:
        staging = Path(tmp) / name
        staging.mkdir()
        details = method.apply(source, staging, config)
        for item in source.path.iterdir():  # tokenizer, chat template, generation config
            if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy2(item, staging / item.name)
        manifest = VariantManifest(
            name=name,
            base_model=source.manifest.base_model,
            family=source.manifest.family,
            method=config.method,
            bits=method.bits,
            parameters=source.manifest.parameters,
            size_bytes=weights_size_bytes(staging),
            dtype=config.compute_dtype if config.compute_dtype != "bf16" else "bfloat16",
            runtimes=["slimserve-cpu-kernels"]
            if config.embedding == "int8"
            else with_vllm_cpu(config.method, method.runtimes),
            provenance={
                "source": source.name,
                "command": "quantize",
                "config": {**vars(config), "keep": config.kept},
                "embedding": TIED_INT8_EMBEDDING if config.embedding == "int8" else "float",
                "seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
                **details,
            },
        )
        manifest.write(staging)
        staging.rename(target)
    return target
