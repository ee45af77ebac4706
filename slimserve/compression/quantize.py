"""Post-training quantization of a variant into a new, registered variant directory.

Each method is one object with one entry point (`apply`) that writes a loadable model directory; the
glue here validates inputs first (`preflight`: what the architecture cannot take is refused before anything
is written), writes into a hidden staging directory, checks the result against its source (`guard`), and
renames it into the registry only when everything succeeded, so a failure never leaves a variant behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimserve.compression.compressed import CompressedTensorsRTN, GroupwiseInt4
from slimserve.compression.quantize_config import (
    CalibrationConfig,
    GPTQConfig,
    Int4Config,
    QuantizationError,
    QuantizeConfig,
    QuantMethod,
    W8A8DynamicConfig,
    W8A8StaticConfig,
    calibration_ids,
    calibration_text,
    method_config,
    require_linears,
)
from slimserve.models.cpu_kernels import TIED_INT8_EMBEDDING
from slimserve.models.loader import parse_dtype
from slimserve.models.manifest import VariantManifest, weights_size_bytes
from slimserve.models.registry import RegisteredVariant, VariantRegistry
from slimserve.models.runtimes import with_vllm_cpu

__all__ = [
    "METHODS",
    "CalibrationConfig",
    "GPTQConfig",
    "Int4Config",
    "QuantMethod",
    "QuantizationError",
    "QuantizeConfig",
    "W8A8DynamicConfig",
    "W8A8StaticConfig",
    "calibration_ids",
    "calibration_text",
    "method_config",
    "preflight",
    "quantize_variant",
]


@dataclass
class BitsAndBytes:
    """LLM.int8 and 4-bit NF4/FP4 through bitsandbytes, as transformers' `BitsAndBytesConfig` applies them.

    Round-to-nearest, no calibration. The saved directory carries its `quantization_config`, so both
    transformers and vLLM load it as is.
    """

    name: str
    bits: int
    quant_type: str | None = None
    config: type[QuantizeConfig] = QuantizeConfig
    """Round-to-nearest through bitsandbytes takes only the options every method takes."""
    runtimes: list[str] = field(default_factory=lambda: ["transformers", "vllm"])

    def check(self, model: Any, config: QuantizeConfig) -> None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizationError(f"{self.name} needs the bitsandbytes package, which is not installed")
        require_linears(model, self.name)

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


METHODS: dict[str, QuantMethod] = {
    "int8-weight": CompressedTensorsRTN("int8-weight", 8),
    "int8-dynamic": CompressedTensorsRTN("int8-dynamic", 8, activations="dynamic", config=W8A8DynamicConfig),
    "int8-static": CompressedTensorsRTN("int8-static", 8, activations="static", config=W8A8StaticConfig),
    "int4-gptq": GroupwiseInt4("int4-gptq", calibrated=True, config=GPTQConfig),
    "int4-rtn": GroupwiseInt4("int4-rtn", calibrated=False),
    "bnb-int8": BitsAndBytes("bnb-int8", 8),
    "bnb-nf4": BitsAndBytes("bnb-nf4", 4, "nf4"),
    "bnb-fp4": BitsAndBytes("bnb-fp4", 4, "fp4"),
}


INT8_EMBEDDING_METHODS = ("int8-weight", "int4-gptq", "int4-rtn")
"""Methods whose output head is weight-only int8 per row, so it can double as the embedding table."""


def preflight(source: RegisteredVariant, config: QuantizeConfig) -> None:
    """Refuse, before any weight is loaded or file written, what cannot be done correctly to this
    architecture: the method's own needs (`QuantMethod.check`) and, with `embedding="int8"`, a tied head and
    an input embedding whose lookup the int8 table reproduces. Reads the model's structure on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimserve.models.cpu_kernels import embedding_scale

    model_config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    METHODS[config.method].check(skeleton, config)
    if config.embedding == "int8":
        if not getattr(model_config, "tie_word_embeddings", False):
            raise QuantizationError("--embedding int8 needs a model whose embedding and output head are tied")
        try:
            embedding_scale(skeleton.get_input_embeddings())
        except ValueError as exc:
            raise QuantizationError(f"--embedding int8 on {type(skeleton).__name__}: {exc}") from exc


def quantize_variant(source_ref: str, config: QuantizeConfig, registry: VariantRegistry | None = None) -> Path:
    """Quantize `source_ref` with `config.method`; returns the registered variant directory.

    Nothing is registered unless the result passes the guard (`guard.check_variant`): a method that cannot be
    applied to the architecture is refused before anything is written, and one that broke the model after."""
    from slimserve.compression.guard import check_variant

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
    preflight(source, config)
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
                "source_path": str(source.path.resolve()),
                "command": "quantize",
                "config": {**vars(config), "keep": config.kept},
                "embedding": TIED_INT8_EMBEDDING if config.embedding == "int8" else "float",
                "seconds": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
                **details,
            },
        )
        manifest.write(staging)
        manifest.provenance["guard"] = check_variant(staging, source.path, config.method, method.bits).to_dict()
        manifest.write(staging)
        staging.rename(target)
    return target
