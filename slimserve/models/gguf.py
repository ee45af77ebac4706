"""A GGUF file as a safetensors variant directory: transformers dequantizes the weights to floats and rebuilds
the tokenizer; this module keeps what that conversion drops.

transformers' GGUF tokenizer loader leaves out the file's `tokenizer.ggml.add_bos_token` flag: Gemma 3's base
model, prompted without its BOS token, babbles. The flags are read from the file (with the `gguf` package, as
transformers reads the rest) and set on the tokenizer before it is saved.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

from slimserve.models.manifest import VariantManifest, weights_size_bytes

log = logging.getLogger(__name__)

TOKENIZER_FLAGS = {"tokenizer.ggml.add_bos_token": "add_bos_token", "tokenizer.ggml.add_eos_token": "add_eos_token"}
"""GGUF metadata keys -> the tokenizer attributes they set."""


def tokenizer_flags(gguf: Path) -> dict[str, bool]:
    """The tokenizer flags a GGUF file sets (`add_bos_token`, `add_eos_token`), as stored in its metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    flags: dict[str, bool] = {}
    for key, attribute in TOKENIZER_FLAGS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            flags[attribute] = bool(field.parts[field.data[0]][0])
    return flags


def convert_gguf(
    gguf: Path,
    staging: Path,
    name: str,
    generation_defaults: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> VariantManifest:
    """Write `gguf` as a float32 variant directory `staging` (weights, config, tokenizer, manifest).

    float32 because a GGUF's k-quant and Q4 values (fp16 scales x small integers) are exact in fp32, not in
    bf16: the converted model is the faithful reference its compressed variants are measured against.
    `generation_defaults` are written into its generation_config (e.g. `do_sample: False`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    started = time.perf_counter()
    log.info("converting %s to safetensors (transformers dequantizes it; once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    flags = tokenizer_flags(gguf)
    for attribute, value in flags.items():
        if hasattr(tokenizer, attribute):
            setattr(tokenizer, attribute, value)
            tokenizer.init_kwargs[attribute] = value  # saved in tokenizer_config.json, so a reload keeps it
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are already
    # plain floats, so the marker is dropped
    setattr(model, "hf_quantizer", None)  # noqa: B010 (mypy types it as a module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        for key, value in (generation_defaults or {}).items():
            setattr(model.generation_config, key, value)
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest = VariantManifest(
        name=name,
        base_model=name,
        method="none",
        bits=32,
        parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=weights_size_bytes(staging),
        dtype="float32",
        runtimes=["transformers", "vllm", "vllm-cpu"],
        provenance={
            "source": str(gguf),
            "source_format": "gguf, dequantized to float32 by transformers",
            "tokenizer_flags": flags,
            "transformers": _version("transformers"),
            "torch": torch.__version__,
            **(provenance or {}),
        },
    )
    manifest.write(staging)
    log.info("%s converted in %.1f s", name, time.perf_counter() - started)
    return manifest


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
