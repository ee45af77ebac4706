"""Post-training quantization of a variant into a new, registered variant directory.

Each method is one object with one entry point (`apply`) that writes a loadable model directory; the
glue here validates inputs first, writes into a hidden staging directory, and renames it into the
registry only when everything succeeded, so a failure never leaves a half-written variant behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from slimserve.compression.data import read_text, train_texts
from slimserve.models.loader import parse_dtype
from slimserve.models.manifest import VariantManifest, weights_size_bytes
from slimserve.models.registry import RegisteredVariant, VariantRegistry


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
    """Weights per quantization group for group-wise 4-bit methods."""
    keep: list[str] = field(default_factory=lambda: ["lm_head"])
    """Module names kept in high precision (embeddings are never quantized)."""
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
        parse_dtype(self.compute_dtype)


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
            bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=config.keep)
        else:
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_compute_dtype=compute,
                llm_int8_skip_modules=config.keep,
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
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
        from compressed_tensors.quantization.utils import calculate_qparams
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
        head = model.get_output_embeddings()
        if "lm_head" not in config.keep and head is not None and getattr(model.config, "tie_word_embeddings", False):
            # a quantized head cannot share its weight with the float embedding table: untie it
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        details: dict[str, Any] = {}
        input_maxima: dict[str, torch.Tensor] = {}
        if self.activations != "none":
            details, input_maxima = self.smooth(model, source, config)
        scheme = self.scheme(config)
        apply_quantization_config(
            model,
            QuantizationConfig(
                config_groups={"group_0": scheme},
                ignore=list(config.keep),
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
                    weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), scheme.weights
                )
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
                quantized += 1
        if quantized == 0:
            raise QuantizationError(f"{source.name!r} has no Linear layers that {self.name} can quantize")
        quant_format = "pack-quantized" if self.activations == "none" else "int-quantized"
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=quant_format)
        compressor.compress_model(model)
        storage = parse_dtype(config.compute_dtype)
        for name, param in model.named_parameters():  # embeddings and norms, kept in float
            if param.is_floating_point() and not name.endswith(("weight_scale", "weight_zero_point")):
                param.data = param.data.to(storage)
        model.config.dtype = storage
        model.save_pretrained(staging)
        compressor.update_config(staging)
        return {"library": "compressed-tensors", "format": quant_format, "quantized_linears": quantized, **details}


METHODS: dict[str, QuantMethod] = {
    "int8-weight": CompressedTensorsRTN("int8-weight", 8),
    "int8-dynamic": CompressedTensorsRTN("int8-dynamic", 8, activations="dynamic"),
    "int8-static": CompressedTensorsRTN("int8-static", 8, activations="static", default_alpha=0.75),
    "bnb-int8": BitsAndBytes("bnb-int8", 8),
    "bnb-nf4": BitsAndBytes("bnb-nf4", 4, "nf4"),
    "bnb-fp4": BitsAndBytes("bnb-fp4", 4, "fp4"),
}


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
            runtimes=list(method.runtimes),
            provenance={
                "source": source.name,
                "command": "quantize",
                "config": {k: v for k, v in vars(config).items()},
                "seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
                **details,
            },
        )
        manifest.write(staging)
        staging.rename(target)
    return target
