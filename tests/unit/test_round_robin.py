"""Predictions for engines that share cores by the OS's turns (vLLM processes on one host): every busy engine
steps its whole batch once a round, so an idle engine woken slows every running row."""

from __future__ import annotations

import pytest

from slimserve.server.predictions import edf_plan, round_robin_plan
from slimserve.server.profile import combined_sharing
from slimserve.server.router import Budget, Router
from tests.candidates import variant

NOW = 100.0


def test_a_woken_engine_waits_for_every_busy_engines_step_each_token() -> None:
    # teacher: 40 ms a step at one row, +5.7 ms a row; int4: 20 ms alone. The request: 15 ms of prefill, 40 tokens.
    teacher = variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=4)
    int4 = variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    joining = round_robin_plan([teacher, int4], teacher, 20, 40, None, now=NOW)
    waking = round_robin_plan([teacher, int4], int4, 20, 40, None, now=NOW)
    assert joining.finish_ms == pytest.approx(15 + 39 * (40 + 40 * 4 / 7))  # 39 rounds of a five-row step
    assert waking.finish_ms == pytest.approx(15 + 39 * (40 + 40 * 3 / 7 + 20))  # each round: both engines
    # each sharing mode's router predicts with its own plan: under the compute thread's deadline turns int4's
    # rows would step apart, and int4 look the faster
    for sharing, plan in (("round_robin", round_robin_plan), ("deadline", edf_plan)):
        router = Router(sharing=sharing, clock=lambda: NOW)
        predicted = router.choose([teacher, int4], Budget(latency_ms=2_800), 20, 40)[1].candidates
        expected = {v.name: plan([teacher, int4], v, 20, 40, 2_800, now=NOW).finish_ms for v in (teacher, int4)}
        assert predicted == pytest.approx(expected, abs=0.1)
        assert (predicted["int4"] < predicted["teacher"]) == (sharing == "deadline")


def test_waking_an_engine_counts_the_running_budgets_it_breaks() -> None:
    # the teacher's one row has 50 tokens left, 2.0 s alone, due in 2.3 s
    teacher = variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=1, pending=[(NOW + 2.3, 50)])
    int4 = variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    # joining: 39 rounds of a two-row step (45.7 ms), then 11 of one row: 2.24 s, still in time
    assert round_robin_plan([teacher, int4], teacher, 20, 40, None, now=NOW).harm == 0
    # waking int4: 39 rounds of 40 + 20 ms, then 11 of 40: 2.8 s, over
    assert round_robin_plan([teacher, int4], int4, 20, 40, None, now=NOW).harm == 1


def test_sequences_of_unknown_length_count_as_long_as_the_request() -> None:
    # two waiting on the teacher, their lengths unknown: 30 tokens each, like the request
    queued = variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, waiting=2)
    int4 = variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    waking = round_robin_plan([queued, int4], int4, 20, 30, None, now=NOW)
    assert waking.finish_ms == pytest.approx(15 + 29 * (40 + 40 / 7 + 20))


def test_a_request_beyond_a_full_batch_waits_for_rounds_of_every_engine() -> None:
    # the teacher's 8 rows fill its batch: a slot frees after 40 / 8 of the request's tokens, each a round of
    # the teacher's full step (80 ms) and int4's one row (20 ms)
    full = variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=8)
    busy = variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=1)
    joining = round_robin_plan([full, busy], full, 20, 40, None, now=NOW)
    assert joining.finish_ms == pytest.approx(40 / 8 * (80 + 20) + 15 + 39 * (80 + 20))


def test_a_family_shares_the_cores_as_its_engines_do() -> None:
    assert combined_sharing(["round_robin", "deadline"]) == "deadline"  # the compute thread orders its turns
    assert combined_sharing(["own", "round_robin"]) == "round_robin"
    assert combined_sharing(["own", "own"]) == "own"
