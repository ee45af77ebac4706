"""The simulator: the real scheduler and router on a virtual clock, deterministic by seed."""

from __future__ import annotations

import itertools

import pytest

from slimserve.server.profile import CostProfile
from slimserve.server.scheduler import PREFILL_TOKENS
from slimserve.server.simulator import POLICIES, Result, Variant, Workload, arrivals, goodput, simulate


def _variant(name: str, step_ms: float, ppl_ratio: float) -> Variant:
    profile = CostProfile(20, step_ms / 25, step_b1_ms=step_ms, step_b8_ms=2.5 * step_ms, load_ms=0)
    return Variant(name, profile, ppl_ratio)


FAMILY = [_variant("teacher", 80, 1.0), _variant("int8", 45, 1.01), _variant("int4", 30, 1.09)]


@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_seed_gives_the_same_numbers_to_the_last_digit(policy: str) -> None:
    workload = Workload(rate_per_s=0.8, count=60, cv=2.0, slo_scale=3.0, seed=7)
    first, again = simulate(FAMILY, workload, policy), simulate(FAMILY, workload, policy)
    assert first.latencies_ms == again.latencies_ms and first.served == again.served
    assert (first.met, first.mean_quality) == (again.met, again.mean_quality)
    assert len(first.latencies_ms) == 60  # every request finished
    other = simulate(FAMILY, Workload(rate_per_s=0.8, count=60, cv=2.0, slo_scale=3.0, seed=8), policy)
    assert other.latencies_ms != first.latencies_ms


def test_workloads_are_seeded_with_budgets_a_scale_of_the_best_unloaded_latency() -> None:
    workload = Workload(rate_per_s=2.0, count=400, cv=1.0, slo_scale=4.0, seed=3)
    requests = arrivals(workload, FAMILY)
    assert requests == arrivals(workload, FAMILY)
    gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(requests)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.15)  # 2 per second
    first = requests[0]
    int4 = FAMILY[2].profile
    best = int4.ttft_ms(first.prompt_tokens) + (first.output_tokens - 1) * int4.step_ms(1)
    assert first.budget_ms == pytest.approx(4.0 * best)
    bursty = arrivals(Workload(rate_per_s=2.0, count=400, cv=3.0, seed=3), FAMILY)
    bursty_gaps = [b.at_s - a.at_s for a, b in itertools.pairwise(bursty)]
    assert max(bursty_gaps) > max(gaps)


def test_alone_at_low_load_a_request_takes_its_unloaded_latency() -> None:
    """One request at a time, on one variant: its prefill (in chunks of `PREFILL_TOKENS`) and its steps at
    batch one, nothing more."""
    workload = Workload(rate_per_s=0.01, count=5, slo_scale=1.001, prompt_tokens=(200, 200), output_tokens=(10, 10))
    result = simulate([FAMILY[2]], workload, "fastest")
    profile = FAMILY[2].profile
    assert PREFILL_TOKENS < 200  # two chunks, each its share of the TTFT
    expected = profile.ttft_ms(200) + 9 * profile.step_ms(1)
    assert result.latencies_ms == pytest.approx([expected] * 5)
    assert result.attainment == 1.0 and result.served == {"int4": 5}


def test_policies_differ_where_they_should() -> None:
    workload = Workload(rate_per_s=0.3, count=60, slo_scale=3.0, seed=1)
    teacher = simulate(FAMILY, workload, "teacher")
    fastest = simulate(FAMILY, workload, "fastest")
    assert teacher.mean_quality == 1.0 and teacher.served == {"teacher": 60}
    assert fastest.mean_quality == pytest.approx(1.09) and fastest.attainment > teacher.attainment
    routed = simulate(FAMILY, workload, "router")
    assert sum(routed.served.values()) == 60 and routed.attainment >= 0.9


def test_goodput_is_the_highest_rate_up_to_which_the_target_held() -> None:
    def result(met: int) -> Result:
        return Result("p", 100, met, 1.0)

    assert goodput({0.1: result(99), 0.2: result(96), 0.4: result(90), 0.8: result(97)}) == 0.2
    assert goodput({0.1: result(50)}) == 0.0
