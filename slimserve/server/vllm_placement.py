"""Where each vLLM engine runs and how much memory it gets: on a GPU an equal share of the device memory
(`gpu_memory_fraction`); on a CPU host a KV cache carved from the server's memory budget (what
`VLLM_CPU_KVCACHE_SPACE` sets for a whole process: `kv_cache_bytes`) and, where the host has cores enough,
cores of its own for its worker's OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND`: `cpu_placements`).

Pure arithmetic on configs and core lists (no vLLM import), so it is tested without vLLM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 2**20

KV_CACHE_MIN_BYTES = 256 * MiB
"""The smallest KV cache a CPU engine is given, whatever the budget leaves (vLLM refuses to start without
room for one full-length sequence; the default model needs 180 MiB for 8192 tokens in bf16)."""

ENGINE_OVERHEAD_MB = 600.0
"""Resident memory of one CPU engine beyond weights and KV cache (its worker process: torch, vLLM,
compiled graphs), counted against the budget before the KV cache is carved from it."""

CPU_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
"""vLLM's CPU placement knobs; set by the user they apply to every variant as given."""


def gpu_memory_fraction(memory_budget_mb: float | None, variants: int, gpu_total_mb: float) -> float:
    """Each resident variant's `gpu_memory_utilization`: an equal share of the server's memory budget."""
    if variants < 1:
        raise ValueError("at least one variant")
    budget = memory_budget_mb if memory_budget_mb is not None else 0.9 * gpu_total_mb
    return max(0.05, min(0.95, budget / variants / gpu_total_mb))


def kv_bytes_per_token(config: Mapping[str, Any], dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token takes in every layer (a config.json of a decoder-only model)."""
    text = config.get("text_config", config)
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    return 2 * int(text["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(share_mb: float, weights_mb: float, per_token: int, max_tokens: int) -> int:
    """The KV cache of one CPU engine: what its share of the budget leaves after its weights and runtime,
    at most what `max_tokens` resident tokens (every sequence at full length) can use, at least
    `KV_CACHE_MIN_BYTES`."""
    left = int((share_mb - weights_mb - ENGINE_OVERHEAD_MB) * MiB)
    return max(KV_CACHE_MIN_BYTES, min(left, per_token * max_tokens))


@dataclass(frozen=True)
class CpuPlacement:
    """Where one variant's vLLM engine runs on a CPU host."""

    omp_threads_bind: str | None
    """VLLM_CPU_OMP_THREADS_BIND for its worker ("0-3", "nobind"; None: as the environment says)."""
    reserved_cpus: int | None
    """VLLM_CPU_NUM_OF_RESERVED_CPU (None: vLLM's default, one core kept for its other processes)."""
    shares_cores: bool
    """Its worker's cores are also another variant's, so their steps take turns (the router's shared compute)."""

    def environment(self) -> dict[str, str | None]:
        """vLLM's placement variables for its engine process (`spawn_environment`; None: left as they are)."""
        reserved = None if self.reserved_cpus is None else str(self.reserved_cpus)
        return {"VLLM_CPU_OMP_THREADS_BIND": self.omp_threads_bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": reserved}


def cpu_placements(variants: int, cpus: Sequence[int], environ: Mapping[str, str] | None = None) -> list[CpuPlacement]:
    """Cores per variant: vLLM's own knobs where the user set them; otherwise one core kept for the API
    process and the engine cores' schedulers where that still leaves each worker two cores or more, and the
    rest split into contiguous equal blocks, one per variant. With fewer cores than variants the workers
    are left unbound (`nobind`) and share every core.

    No core is kept where a worker would be left one: on two cores a worker bound to both served 8 clients
    12-28% faster than vLLM's own placement (worker on core 0, core 1 kept) and one client as fast
    (docs/BENCHMARKS.md, vLLM's CPU placements). Two variants on two cores get a core each."""
    environ = os.environ if environ is None else environ
    if any(key in environ for key in CPU_ENV):
        return [CpuPlacement(None, None, shares_cores=variants > 1)] * variants
    count = len(cpus)
    reserve = 1 if (count - 1) // variants >= 2 else 0
    usable = list(cpus)[: count - reserve] if reserve else list(cpus)
    if len(usable) < variants:  # vLLM's auto binding would pin every worker to the same first core
        return [CpuPlacement("nobind", None, shares_cores=True)] * variants
    per = len(usable) // variants
    blocks = [usable[i * per : (i + 1) * per] for i in range(variants)]
    return [CpuPlacement(_cpu_list(block), reserve, shares_cores=False) for block in blocks]


def _cpu_list(cpus: Sequence[int]) -> str:
    """ "0-3" for a contiguous block, "0,2,5" otherwise (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    ids = list(cpus)
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


@contextmanager
def spawn_environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, leave) environment variables while an engine process is spawned."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def read_config(path: Path) -> dict[str, Any]:
    """A variant's config.json."""
    data: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    return data


def memory_args(kv_cache_bytes: int | None, gpu_memory_utilization: float) -> dict[str, Any]:
    """vLLM's engine arguments for an engine's memory: its KV cache on a CPU host (unless the user's
    VLLM_CPU_KVCACHE_SPACE sizes every engine's), its share of the device on a GPU."""
    if kv_cache_bytes is not None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        return {"kv_cache_memory_bytes": kv_cache_bytes}
    return {"gpu_memory_utilization": gpu_memory_utilization}
