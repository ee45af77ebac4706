"""How a variant is loaded into memory with transformers (the CPU backend).

The server's engines sit on top of this seam: the transformers engine uses `load_variant`; a vLLM engine
loads the same variant directory itself and needs only the registry's path and manifest.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.models.cpu_attention import use_cpu_attention
from slimserve.models.cpu_kernels import (
    TIED_INT8_EMBEDDING,
    accelerate_compressed_linears,
    is_compressed_tensors,
    native_bf16,
    tie_int8_embedding,
)
from slimserve.models.fused_projections import fuse_projections
from slimserve.models.manifest import VariantManifest
from slimserve.models.registry import VariantRegistry

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


_LOADING = threading.Lock()
"""One load at a time per process: transformers builds models under process-wide default-device contexts
(meta-device initialisation), so two engine threads loading at once corrupted each other's modules
(measured: an int8-dynamic variant loaded beside an int4 one failed its first forward)."""


FAST = "fast"
"""The default compute dtype: bf16 where the machine runs it natively, else as stored (`fast_float_dtype`)."""


def fast_float_dtype(stored: torch.dtype = torch.float32) -> torch.dtype:
    """The faster compute dtype for a float variant on this machine: bf16 if native, else as stored."""
    return torch.bfloat16 if native_bf16() else stored


def parse_dtype(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """`None` or `auto` -> `default`; `fast` -> `fast_float_dtype(default)`; otherwise one of DTYPES, with an
    error that lists them."""
    if name is None or name == "auto":
        return default
    if name == FAST:
        return fast_float_dtype(default)
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}, 'auto' or 'fast'") from None


@dataclass
class LoadedVariant:
    """A variant in memory: `model(input_ids).logits` gives next-token logits, shape (B, T, vocab)."""

    name: str
    path: Path
    manifest: VariantManifest
    model: Any
    tokenizer: Any
    dtype: torch.dtype
    load_seconds: float

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """temperature/top_p/top_k that the variant's generation_config.json sets explicitly
        (`do_sample: false` is greedy, temperature 0).

        A server applies them to requests that leave those fields out, as vLLM does by default.
        """
        gen = getattr(self.model, "generation_config", None)
        explicit = gen.to_diff_dict() if gen is not None else {}
        defaults = {key: explicit[key] for key in ("temperature", "top_p", "top_k") if explicit.get(key) is not None}
        if explicit.get("do_sample") is False:
            return {"temperature": 0.0}  # do_sample=false means greedy in transformers' terms
        return defaults

    @property
    def eos_token_ids(self) -> set[int]:
        """Token ids that end a generation: the tokenizer's EOS plus the generation config's."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        return ids


def load_variant(
    path_or_name: str | os.PathLike[str],
    dtype: str | None = None,
    registry: VariantRegistry | None = None,
    fused: bool = False,
) -> LoadedVariant:
    """Load a variant by directory or registered name.

    `dtype` is the compute dtype: `None`/`auto` keeps float variants as stored (quantized ones compute
    in bf16); `fast` (the server's default) is bf16 where the machine runs it natively and the stored dtype
    elsewhere (emulated bf16 is slower than fp32). Quantized variants compute in bf16 under `fast` either
    way: their fused int8/int4 kernels are faster in bf16 on both kinds of CPU (docs/BENCHMARKS.md, "Compute
    dtype and speed").

    `fused` joins each layer's q/k/v and gate/up projections into one matmul each (`fused_projections`),
    for serving: a fused model has other module names, so it is neither saved nor trained.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    variant = (registry or VariantRegistry()).resolve(path_or_name)
    manifest = variant.manifest
    stored = DTYPES.get(manifest.dtype, torch.float32)
    quantized = manifest.bits < 16
    if dtype == FAST and quantized:
        torch_dtype = torch.bfloat16
    else:
        torch_dtype = parse_dtype(dtype, default=torch.bfloat16 if quantized else stored)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(variant.path)
    tied_int8 = manifest.provenance.get("embedding") == TIED_INT8_EMBEDDING
    with _LOADING, _quiet_missing_embedding(tied_int8):
        model = AutoModelForCausalLM.from_pretrained(variant.path, dtype=torch_dtype)
        if is_compressed_tensors(model.config):
            accelerate_compressed_linears(model)
        if tied_int8:
            tie_int8_embedding(model, torch_dtype)
    # transformers' SDPA path repeats grouped KV heads under a mask, and torch's bf16 attention on the CPU is
    # slow for decode steps (`cpu_attention` says why)
    use_cpu_attention(model)
    if fused:
        fuse_projections(model)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedVariant(
        name=manifest.name,
        path=variant.path,
        manifest=manifest,
        model=model,
        tokenizer=tokenizer,
        dtype=torch_dtype,
        load_seconds=time.perf_counter() - started,
    )


@contextmanager
def _quiet_missing_embedding(active: bool) -> Iterator[None]:
    """transformers reports the (intentionally) absent embedding table as newly initialised: expected here."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
