"""The simulator's vLLM engine: vLLM's V1 step (running rows decode, waiting prompts admitted by priority into
the same step, chunked within the token budget) on a virtual clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.server.predictions import round_robin_plan
from slimserve.server.profile import CostProfile
from slimserve.server.sim_engine import SimJob, Variant
from slimserve.server.sim_vllm import VllmSimEngine
from slimserve.server.simulator import POLICIES, Workload, simulate
from tests.unit.test_simulator import FAMILY, _register


def _profile() -> CostProfile:
    """Steps of 10 ms + 1 ms a row; a prefill of 20 ms + 0.5 ms a token."""
    return CostProfile(
        0,
        0,
        step_b1_ms=0,
        step_b8_ms=0,
        load_ms=0,
        step_points=((1, 11.0), (8, 18.0)),
        prefill_points=((1, 20.5), (256, 148.0)),
    )


def _engine(max_batch_size: int = 16, budget: int = 2048) -> VllmSimEngine:
    variant = Variant("v", _profile(), 1.0, max_batch_size=max_batch_size, engine="vllm")
    return VllmSimEngine(dataclasses.replace(variant, max_num_batched_tokens=budget))


def _job(prompt: int, tokens: int, deadline: float | None = None, at: float = 0.0) -> SimJob:
    return SimJob(prompt, tokens, deadline, at, budget_ms=1000.0)


def test_a_request_arriving_while_others_decode_gets_its_first_token_after_one_mixed_step() -> None:
    engine = _engine()
    decoding = [_job(64, 10) for _ in range(3)]
    engine.queue += decoding
    spent, _ = engine.step(0.0)  # the three prompts together, each its first token
    assert spent == pytest.approx(3 * engine.truth.ttft_ms(64) / 1000)
    assert [j.generated for j in decoding] == [1, 1, 1]
    late = _job(100, 10, at=spent)
    engine.queue.append(late)
    more, _ = engine.step(spent)
    # one step: the three rows decode and the new prompt is prefilled alongside, its token at the step's end
    assert more == pytest.approx((engine.truth.step_ms(3) + engine.truth.ttft_ms(100)) / 1000)
    assert late.generated == 1 and late.last_token_at == pytest.approx(spent + more)
    assert [j.generated for j in decoding] == [2, 2, 2]
    assert engine.rows() == [*decoding, late] and not engine.queue


def test_the_router_sees_waiting_requests_as_the_real_vllm_engine_reports_them() -> None:
    """`VllmEngine.deadlines` lists every request in flight, since slimserve does not see which vLLM admitted:
    the simulated engine reports the same, so the router plans alike in both."""
    engine = _engine(max_batch_size=1)
    running, waiting = _job(64, 10, deadline=2.0), _job(64, 30, deadline=5.0)
    engine.queue += [waiting, running]
    engine.step(0.0)  # one slot: the one due first is admitted, the other waits
    assert engine.rows() == [running] and engine.queue == [waiting]
    assert engine.deadlines() == [(2.0, 9), (5.0, 30)]


def test_a_request_due_before_the_waiting_ones_is_planned_to_be_admitted_ahead_of_them() -> None:
    """vLLM admits waiting requests by deadline (`deadline_priority`), so a tight request on a full engine
    waits only for the free slot, not behind loose requests queued before it; the plan says so."""
    engine = _engine(max_batch_size=1)
    engine.queue.append(_job(64, 40, deadline=1.0))
    engine.step(0.0)  # it holds the only slot
    engine.queue += [_job(64, 20, deadline=8.0), _job(64, 20, deadline=9.0)]
    assert [engine.waiting_before(d) for d in (0.5, 8.0, None)] == [0, 1, 2]
    tight = round_robin_plan([engine], engine, 64, 10, deadline_ms=500, now=0.1)
    loose = round_robin_plan([engine], engine, 64, 10, deadline_ms=9_500, now=0.1)
    # the loose request waits for the two prefills ahead of it and for their slots (10 of its tokens' rounds each)
    ahead_ms = 2 * engine.profile.ttft_ms(64) + 2 * 10 * engine.profile.step_ms(1)
    assert loose.finish_ms - tight.finish_ms == pytest.approx(ahead_ms)


def test_a_prompt_beyond_the_token_budget_is_prefilled_in_chunks_while_the_batch_decodes() -> None:
    engine = _engine(budget=64)
    row = _job(8, 20)
    engine.queue.append(row)
    engine.step(0.0)
    long = _job(150, 5)
    engine.queue.append(long)
    chunks = []
    now = 0.0
    while long.generated == 0:
        spent, _ = engine.step(now)
        now += spent
        chunks.append(engine.computed[long])
    # the decoding row takes one token of each step's budget, the prompt the rest
    assert chunks == [63, 126, 150] and row.generated == 1 + 3


def test_deadlines_order_admission_as_vllm_priorities() -> None:
    engine = _engine(max_batch_size=1)
    loose, tight, none = _job(32, 1, deadline=9.0), _job(32, 1, deadline=2.0), _job(32, 1, deadline=None)
    engine.queue += [none, loose, tight]  # in order of arrival
    now, order = 0.0, []
    while engine.queue or engine.rows():
        spent, finished = engine.step(now)
        now += spent
        order += finished
    assert order == [tight, loose, none]


def test_alone_a_request_on_vllm_takes_its_prefill_and_one_step_per_further_token() -> None:
    variant = Variant("v", _profile(), 1.0, engine="vllm")
    workload = Workload(rate_per_s=0.01, count=3, prompt_tokens=(200, 200), output_tokens=(10, 10), jitter=0.0)
    result = simulate([variant], workload, "fastest")
    alone = variant.profile.ttft_ms(200) + 9 * variant.profile.step_ms(1)
    assert result.latencies_ms == pytest.approx([alone] * 3)


@pytest.mark.parametrize("policy", POLICIES)
def test_vllm_engines_give_the_same_numbers_for_the_same_seed(policy: str) -> None:
    family = [dataclasses.replace(v, engine="vllm", max_num_batched_tokens=128) for v in FAMILY]
    workload = Workload(rate_per_s=0.8, count=60, cv=2.0, slo_scale=3.0, seed=7)
    first, again = simulate(family, workload, policy), simulate(family, workload, policy)
    assert first.latencies_ms == again.latencies_ms and first.routed == again.routed and first.met == again.met
    assert len(first.latencies_ms) == 60
    assert first.latencies_ms != simulate(FAMILY, workload, policy).latencies_ms  # another engine, other figures


def test_simulate_on_vllm_reads_the_vllm_profiles_and_names_the_command_when_one_is_missing(
    slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = {"ttft_ms_128": 50.0, "decode_tok_s_b1": 40.0, "decode_tok_s_b8": 160.0}
    vllm = {**summary, "prefill_ms": {"128": 30.0}, "step_ms": {"1": 8.0, "8": 16.0}, "max_num_batched_tokens": 256}
    _register(slimserve_home, "teacher", {**summary, "perplexity": 10.0, "cost_profile_vllm": vllm})
    _register(slimserve_home, "int4", {**summary, "perplexity": 11.0})
    argv = ["simulate", "--variant", "teacher", "--rates", "0.5", "--slo-scales", "3", "--cvs", "1", "--count", "10"]
    assert main([*argv, "--backend", "vllm"]) == 0
    assert "| 1 | 3 | 0.5 | " in capsys.readouterr().out
    assert main([*argv, "--variant", "int4", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "int4 has no measured vllm cost profile" in err and "`slimserve profile int4 --backend vllm`" in err
