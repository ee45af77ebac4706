"""The vLLM backend's adapters (no GPU needed) and, on a GPU machine with vllm, the backend itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slimserve.models import VariantManifest
from slimserve.server.sampling import SamplingParams
from slimserve.server.vllm_engine import (
    DeltaConverter,
    gpu_memory_fraction,
    servable_by_vllm,
    vllm_available,
    vllm_sampling_kwargs,
)


def test_sampling_parameters_map_one_to_one() -> None:
    params = SamplingParams(
        max_tokens=7, temperature=0.3, top_p=0.9, top_k=0, seed=5, stop=["\n"], logprobs=2, logit_bias={11: -100.0}
    )
    kwargs = vllm_sampling_kwargs(params)
    assert kwargs["top_k"] == -1  # vLLM's "disabled"
    assert (kwargs["max_tokens"], kwargs["temperature"], kwargs["seed"], kwargs["stop"]) == (7, 0.3, 5, ["\n"])
    assert kwargs["logprobs"] == 2 and kwargs["logit_bias"] == {11: -100.0} and kwargs["n"] == 1


@dataclass
class _Logprob:
    logprob: float


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class _Output:
    """The fields of vllm.RequestOutput the converter reads (vllm is not installed on CPU machines)."""

    outputs: list[_Completion] = field(default_factory=list)
    finished: bool = False


def test_delta_outputs_become_generation_events() -> None:
    converter = DeltaConverter(top_n=1)
    first = converter.convert(
        _Output([_Completion("Hel", [5, 6], [{5: _Logprob(-0.1), 9: _Logprob(-2.0)}, {6: _Logprob(-0.5)}])])
    )
    assert (first.text, first.token_ids, first.finish_reason, first.completion_tokens) == ("Hel", [5, 6], None, 2)
    assert first.logprobs[0].top == [(5, -0.1)] and first.logprobs[1].logprob == -0.5
    last = converter.convert(_Output([_Completion("lo", [7], None, "stop")], finished=True))
    assert (last.finish_reason, last.completion_tokens) == ("stop", 3)


def test_variants_vllm_cannot_load_are_refused_with_the_reason() -> None:
    portable = VariantManifest(
        name="a",
        base_model="a",
        method="int8-weight",
        bits=8,
        parameters=1,
        size_bytes=1,
        dtype="bfloat16",
        runtimes=["transformers", "vllm"],
    )
    tied = VariantManifest(
        name="b",
        base_model="a",
        method="int4-gptq",
        bits=4,
        parameters=1,
        size_bytes=1,
        dtype="bfloat16",
        runtimes=["slimserve-cpu-kernels"],
    )
    assert servable_by_vllm(portable) is None
    reason = servable_by_vllm(tied)
    assert reason is not None and "slimserve-cpu-kernels" in reason and "--backend transformers" in reason


def test_gpu_memory_is_split_by_the_budget() -> None:
    assert gpu_memory_fraction(40_000, 2, 80_000) == pytest.approx(0.25)
    assert gpu_memory_fraction(None, 1, 80_000) == pytest.approx(0.9)
    assert gpu_memory_fraction(1, 4, 80_000) == 0.05  # never below what vLLM can start with


def test_auto_backend_is_transformers_without_vllm() -> None:
    from slimserve.cli import choose_backend

    if vllm_available():
        pytest.skip("this machine has vLLM and a GPU")
    assert choose_backend("auto") == "transformers"
    with pytest.raises(ValueError, match="gpu extra"):
        choose_backend("vllm")


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="needs a CUDA GPU and the gpu extra (vllm)")
def test_vllm_backend_serves_the_default_model_through_the_same_routes() -> None:  # pragma: no cover - GPU only
    import time

    from fastapi.testclient import TestClient

    from slimserve.cli import vllm_engines
    from slimserve.models import DEFAULT_VARIANT, VariantRegistry
    from slimserve.server.app import create_app
    from slimserve.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    engines = vllm_engines([DEFAULT_VARIANT], VariantRegistry(), metrics, memory_budget_mb=None, explicit=True)
    with TestClient(create_app(engines, metrics)) as client:
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.5)
        body = {
            "model": DEFAULT_VARIANT,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 24,
            "logprobs": True,
            "top_logprobs": 2,
        }
        reply = client.post("/v1/chat/completions", json=body).json()
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert len(reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
        assert reply["usage"]["completion_tokens"] <= 24
        stopped = client.post("/v1/chat/completions", json={**body, "stop": ["Paris"]}).json()
        assert "Paris" not in stopped["choices"][0]["message"]["content"]
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 3
