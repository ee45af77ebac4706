"""Budget routing: the router's choices and predictions on described variants (the server routing real tiny
models: `test_routing_server.py`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest

from slimserve.server.predictions import alone_ms, deadline_harm, edf_plan, predict_ms
from slimserve.server.profile import OUTLIER_BOUND, CostProfile
from slimserve.server.router import BUSY_CALIBRATION, Budget, BudgetError, Router, parse_budget, workhorse_ms
from slimserve.server.vllm_priority import waiting_ahead
from tests.candidates import Described
from tests.candidates import variant as _variant

TEACHER = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900)
INT8 = _variant("int8", step_ms=25, ppl_ratio=1.01, memory_mb=400)
INT4 = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
FAMILY = [TEACHER, INT8, INT4]


def test_tight_budgets_go_to_fast_variants_and_loose_ones_to_the_best() -> None:
    router = Router()
    # 100 tokens: teacher ~4.1 s, int8 ~2.6 s, int4 ~2.1 s
    assert router.choose(FAMILY, Budget(latency_ms=10_000), 20, 100)[1].variant == "teacher"
    assert router.choose(FAMILY, Budget(latency_ms=3_000), 20, 100)[1].variant == "int8"
    decision = router.choose(FAMILY, Budget(latency_ms=2_300), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int4", True)
    impossible = router.choose(FAMILY, Budget(latency_ms=500), 20, 100)[1]
    assert (impossible.variant, impossible.budget_met) == ("int4", False)
    assert "fastest" in impossible.reason
    assert router.choose(FAMILY, Budget(), 20, 100)[1].variant == "teacher"
    assert len(router.recent()) == 5


def test_the_masking_cost_of_a_constrained_request_counts_against_its_budget() -> None:
    """3 s fits int8 (~2.6 s) unconstrained; with 5 ms of masking per token (+0.5 s) it no longer does."""
    router = Router()
    free = router.choose(FAMILY, Budget(latency_ms=3_000), 20, 100)[1]
    masked = router.choose(FAMILY, Budget(latency_ms=3_000), 20, 100, extra_ms=100 * 5.0)[1]
    assert (free.variant, masked.variant) == ("int8", "int4")
    assert masked.candidates["int8"] == pytest.approx(free.candidates["int8"] + 500, abs=1)


def test_equal_quality_goes_to_the_faster_variant_and_the_budget_is_the_limit() -> None:
    near_exact = _variant("int8-exact", step_ms=25, ppl_ratio=1.002, memory_mb=400)
    # +0.2% counts as the teacher's quality: the faster variant serves, leaving the cores to others
    assert Router().choose([TEACHER, near_exact], Budget(latency_ms=60_000), 20, 100)[1].variant == "int8-exact"
    assert Router(quality_tolerance=0).choose([TEACHER, near_exact], Budget(60_000), 20, 100)[1].variant == "teacher"
    # with no budget at all, the best quality itself: naming the teacher's family gets the teacher
    assert Router().choose([TEACHER, near_exact], Budget(), 20, 100)[1].variant == "teacher"
    # the budget itself is the limit, no headroom kept off it: 1% over the teacher's prediction gets the
    # teacher, 1% under gets int8, and the teacher alone is then a predicted miss
    teacher_ms = predict_ms(TEACHER, 20, 100, None)
    assert Router().choose(FAMILY, Budget(latency_ms=teacher_ms * 1.01), 20, 100)[1].variant == "teacher"
    assert Router().choose(FAMILY, Budget(latency_ms=teacher_ms * 0.99), 20, 100)[1].variant == "int8"
    alone = Router().choose([TEACHER], Budget(latency_ms=teacher_ms * 0.99), 20, 100)[1]
    assert alone.budget_met is False and alone.reason == "no variant predicted within the latency budget: fastest"


def test_a_request_is_not_placed_where_it_pushes_running_ones_over_their_budget() -> None:
    now = time.perf_counter()
    # int4 runs one sequence with 100 tokens to go at 20 ms each (2.0 s) and 2.5 s left: 0.5 s of slack
    protected = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=1, pending=[(now + 2.5, 100)])
    family = [TEACHER, INT8, protected]
    # a new request of 40 tokens due in 1.2 s runs first under EDF. On int8 (15 ms prefill + 40 x 25 ms) it
    # fits, but int4's sequence then finishes at 3.0 s; joining int4's batch (40 x 22.9 ms) fits and leaves
    # int4's sequence at 2.3 s
    on_int8 = edf_plan(family, INT8, 20, 40, 1200)
    assert (on_int8.finish_ms, on_int8.harm) == (pytest.approx(1015), 1)
    assert edf_plan(family, protected, 20, 40, 1200).harm == 0
    decision = Router().choose(family, Budget(latency_ms=1200), 20, 40)[1]
    assert (decision.variant, decision.budget_met) == ("int4", True)
    # a sequence without a budget is not protected (it advances at the round-robin pace)...
    unprotected = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=1)
    assert Router().choose([TEACHER, INT8, unprotected], Budget(latency_ms=1200), 20, 40)[1].variant == "int8"
    # ...nor is one that will miss its budget anyway
    lost = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=1, pending=[(now + 1.0, 100)])
    assert Router().choose([TEACHER, INT8, lost], Budget(latency_ms=1200), 20, 40)[1].variant == "int8"
    # a loose request waits behind int4's sequence instead of delaying it: the teacher serves it
    loose = edf_plan(family, TEACHER, 20, 100, 54_000)
    assert loose.harm == 0 and loose.finish_ms == pytest.approx(15 + 100 * 20 + 100 * 40)
    assert Router().choose(family, Budget(latency_ms=60_000), 20, 100)[1].variant == "teacher"


def test_the_router_calibrates_its_predictions_from_finished_requests() -> None:
    router = Router()
    first = router.choose(FAMILY, Budget(latency_ms=5_000), 20, 100)[1]
    assert first.variant == "teacher"
    for _ in range(30):  # requests take twice as long as the profiles predict, each decided at the calibration then
        decision = router.choose(FAMILY, Budget(latency_ms=50_000), 20, 100)[1]
        assert decision.variant == "teacher"
        router.observe(decision, 2 * first.predicted_ms)
    # the calibration reaches the profiles' error, not its square root (where a scaled prediction compared with
    # the outcome would settle it)
    assert router.calibration == pytest.approx(2.0, rel=0.02)
    again = router.choose(FAMILY, Budget(latency_ms=5_000), 20, 100)[1]
    assert again.variant == "int4" and again.predicted_ms == pytest.approx(2 * 2015, rel=0.02)


def test_requests_predicted_to_miss_teach_the_router_nothing() -> None:
    """A request no variant could serve in time falls back to the fastest and then runs in the background:
    its overrun must not raise the calibration, which would make budgets that variant can meet look out of
    reach."""
    router = Router()
    hopeless = router.choose(FAMILY, Budget(latency_ms=500), 20, 100)[1]
    assert (hopeless.variant, hopeless.budget_met) == ("int4", False)
    for _ in range(20):
        router.observe(hopeless, 4 * hopeless.predicted_ms)
    assert router.calibration == 1.0
    fitting = router.choose(FAMILY, Budget(latency_ms=2_300), 20, 100)[1]
    assert (fitting.variant, fitting.budget_met) == ("int4", True)
    for _ in range(10):  # the ones it placed within budget still teach it
        router.observe(fitting, 1.2 * fitting.predicted_ms)
    assert router.calibration == pytest.approx(1.2 - (1.2 - 1.0) * (1 - router.calibration_smoothing) ** 10)


def test_a_request_that_will_miss_joins_the_workhorse_batch_not_an_idle_slower_engine() -> None:
    """On shared cores an idle slower variant finishes a hopeless request sooner than the busy fastest one,
    but its steps would then slow every round; one more row in int4's running batch costs little."""
    crowded = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=6)  # 50 tokens left each
    family = [TEACHER, INT8, crowded]
    # 100 tokens on int4: its 7-row steps (37.1 ms) for all 100; on idle int8: 100 x 25 ms
    assert edf_plan(family, INT8, 20, 100, 300).finish_ms < edf_plan(family, crowded, 20, 100, 300).finish_ms
    # its share of the batch it joins: 15 + 100 x (int4's 7-row step, 37.1 ms, over 7 rows); int8 idle: alone
    assert workhorse_ms(crowded, 20, 100) == pytest.approx(15 + 100 * (20 + 6 / 7 * 20) / 7)
    assert workhorse_ms(INT8, 20, 100) == pytest.approx(15 + 100 * 25)
    decision = Router().choose(family, Budget(latency_ms=300), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int4", False) and "fastest" in decision.reason


def test_a_request_only_its_own_steps_can_save_goes_where_they_can() -> None:
    """When no variant is predicted within the budget, a request that steps of its own could still finish
    in time goes to a variant fast enough alone (its chance under EDF turns), not to the running batch it
    would otherwise join where even alone it would miss; if that batch is fast enough alone, there."""
    now = time.perf_counter()
    # int8 steps six rows due in 0.5 s (10 tokens each): under EDF they go first, wherever the request lands
    busy = _variant("int8", step_ms=22, ppl_ratio=1.01, memory_mb=400, running=6, pending=[(now + 0.5, 10)] * 6)
    idle = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    # 40 tokens alone: 15 ms prefill + 40 x 20 ms = 815 ms on int4, 895 ms on int8; int8's share of its batch
    # of 7 is far less
    assert alone_ms(idle, 20, 40) == pytest.approx(815) and alone_ms(busy, 20, 40) == pytest.approx(895)
    assert workhorse_ms(busy, 20, 40) < workhorse_ms(idle, 20, 40)
    # behind int8's due rows (10 steps of its 6-row batch, 377 ms) neither is predicted within 1.1 s
    assert edf_plan([busy, idle], idle, 20, 40, 1100).finish_ms == pytest.approx(15 + 10 * (22 + 5 / 7 * 22) + 800)
    assert edf_plan([busy, idle], busy, 20, 40, 1100).finish_ms > 1100
    router = Router()
    decision = router.choose([busy, idle], Budget(latency_ms=850), 20, 40)[1]
    assert (decision.variant, decision.budget_met) == ("int4", False) and "alone make it" in decision.reason
    # both fast enough alone: the running batch, so no second engine wakes
    decision = router.choose([busy, idle], Budget(latency_ms=1100), 20, 40)[1]
    assert (decision.variant, decision.budget_met) == ("int8", False) and "alone make it" in decision.reason
    # a budget not even the fastest alone can meet still goes to the workhorse
    decision = router.choose([busy, idle], Budget(latency_ms=700), 20, 40)[1]
    assert (decision.variant, decision.budget_met) == ("int8", False) and "alone" not in decision.reason


def test_a_tight_request_joining_a_busy_batch_is_predicted_at_the_pace_of_its_own_steps() -> None:
    """The engine steps a row apart from the rest of its batch when its deadline needs it, so a tight request
    on a batch of loose ones costs its own steps, not the batch's; one it cannot save runs with the batch."""
    now = time.perf_counter()
    loose = [(now + 60, 50)] * 6
    busy = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=6, pending=loose)
    # 40 tokens due in 1.08 s: 15 ms prefill + 40 x 20 ms alone (the batch of 7 would take 40 x 37.1 ms)
    assert edf_plan([busy], busy, 20, 40, 1080).finish_ms == pytest.approx(15 + 40 * 20)
    # the loose rows' own deadline still counts them as one batch of 7 (and nobody is pushed over)
    assert edf_plan([busy], busy, 20, 40, 1080).harm == 0
    # due in 0.5 s, its 40 tokens cannot make it even alone: it steps with the batch
    assert edf_plan([busy], busy, 20, 40, 500).finish_ms == pytest.approx(15 + 40 * (20 + 6 / 7 * 20))
    # a running row the batch's pace would miss (20 tokens in 0.5 s: 20 x 37.1 ms) but its own steps make
    # (20 x 20 ms) can still be saved: a 200-token prompt's 105 ms prefill ahead of it pushes it over
    rows = [(now + 0.5, 20), *loose[:5]]
    tight = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300, running=6, pending=rows)
    assert edf_plan([tight], tight, 200, 10, 5_000).harm == 1


def test_busy_cores_join_a_running_batch_whose_share_costs_less_than_an_idle_variant_alone() -> None:
    """A variant already stepping a batch adds one row's share of its step per token; an idle variant adds
    its whole step: on shared cores the running batch is the cheaper place, even when it is slower alone."""
    now = time.perf_counter()
    slow_busy = _variant("int8", step_ms=25, ppl_ratio=1.09, memory_mb=400, running=1, pending=[(now + 60, 400)])
    fast = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    # equal quality; both fit 5 s. int8's 2-row step (28.6 ms) shared by two rows costs 14.3 ms a token,
    # int4 alone 20
    assert workhorse_ms(slow_busy, 20, 100) == pytest.approx(15 + 100 * (25 + 25 / 7) / 2)
    assert workhorse_ms(slow_busy, 20, 100) < workhorse_ms(fast, 20, 100)
    assert edf_plan([slow_busy, fast], fast, 20, 100, 5_000).finish_ms < 5_000
    decision = Router().choose([slow_busy, fast], Budget(latency_ms=5_000), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int8", True)


def test_busy_cores_rank_variants_by_their_own_steps_not_by_how_well_they_batch() -> None:
    """With nothing in flight a request would step alone: ranked at a full batch, the variant that batches
    best would take it even where its own steps are much slower (the fp32 student on an AVX-512 machine:
    the cheapest at 8 rows, 1.7x slower alone)."""
    fast = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    fast.profile.step_b8_ms = 60  # 7.5 ms per sequence at 8 rows
    batches_well = _variant("fp32", step_ms=30, ppl_ratio=1.09, memory_mb=400)
    batches_well.profile.step_b8_ms = 45  # 5.6 ms per sequence at 8 rows
    assert workhorse_ms(fast, 20, 100) < workhorse_ms(batches_well, 20, 100)
    # nothing in flight, equal quality, both fit 5 s: the one faster alone
    decision = Router().choose([batches_well, fast], Budget(latency_ms=5_000), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int4", True)
    # and a request no variant can make
    decision = Router().choose([batches_well, fast], Budget(latency_ms=300), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int4", False)


def test_among_equal_qualities_busy_cores_join_the_running_batch_not_an_idle_engine() -> None:
    """An idle variant of the same quality is predicted to finish sooner than joining a running batch, but
    waking it adds its steps to every round: among equals, a running batch nearly as fast alone serves."""
    now = time.perf_counter()
    busy = _variant("int8", step_ms=25, ppl_ratio=1.4, memory_mb=100, running=3, pending=[(now + 120, 50)] * 3)
    busy.profile.step_b8_ms = 30
    idle = _variant("fp32", step_ms=22, ppl_ratio=1.4, memory_mb=400)
    idle.profile.step_b8_ms = 60
    router = Router()
    plans = {c.name: edf_plan([busy, idle], c, 20, 100, 60_000).finish_ms for c in (busy, idle)}
    assert plans["fp32"] < plans["int8"]
    decision = router.choose([busy, idle], Budget(latency_ms=60_000), 20, 100)[1]
    assert decision.variant == "int8" and decision.reason.startswith("best quality")


def test_busy_cores_rank_variants_by_their_measured_figures_not_by_the_contention_they_served_under() -> None:
    """The variant that serves under load learns slower profiles (its steps share the cores with the event
    loop and the others); ranked by them, busy cores would drift to a variant that is slower alone."""
    fast = _variant("int4", step_ms=20, ppl_ratio=1.09, memory_mb=300)
    slow = _variant("student", step_ms=30, ppl_ratio=1.09, memory_mb=400)
    for _ in range(50):  # int4 served under load: its steps took 40 ms
        fast.profile.observe_step(1, 0.040)
    assert fast.profile.step_ms(1) == pytest.approx(40, rel=0.01)
    assert fast.profile.step_ms(1) > slow.profile.step_ms(1)
    assert workhorse_ms(fast, 20, 100) == pytest.approx(15 + 100 * 20)
    hopeless = Router().choose([slow, fast], Budget(latency_ms=300), 20, 100)[1]
    assert (hopeless.variant, hopeless.budget_met) == ("int4", False)


def test_memory_and_quality_budgets_exclude_variants() -> None:
    router = Router()
    assert router.choose(FAMILY, Budget(memory_mb=500), 20, 100)[1].variant == "int8"
    with pytest.raises(BudgetError, match="smaller than every variant"):
        router.choose(FAMILY, Budget(memory_mb=100), 20, 100)
    # quality 1.05 rules out int4 even when only int4 would meet the latency
    decision = router.choose(FAMILY, Budget(latency_ms=2_300, max_ppl_ratio=1.05), 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int8", False)
    # a floor nothing reaches: the best available quality, said to miss the budget
    unreachable = router.choose([INT8, INT4], Budget(latency_ms=60_000, max_ppl_ratio=1.005), 20, 100)[1]
    assert (unreachable.variant, unreachable.budget_met) == ("int8", False)
    assert "no variant reaches quality ratio 1.005" in unreachable.reason


def test_queue_and_loading_count_against_a_variant() -> None:
    busy_teacher = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=8, waiting=8)
    assert predict_ms(busy_teacher, 20, 100, None) > 2 * predict_ms(TEACHER, 20, 100, None)
    decision = Router().choose([busy_teacher, INT8], Budget(latency_ms=6_000), 20, 100)[1]
    assert decision.variant == "int8"  # overloaded teacher: shed to the faster variant
    on_disk = _variant("int8", step_ms=25, ppl_ratio=1.01, memory_mb=400, resident=False)
    assert predict_ms(on_disk, 20, 100, None) == pytest.approx(predict_ms(INT8, 20, 100, None) + 3000)


@dataclass
class _AdmitsByDeadline(Described):
    """A variant whose engine admits waiting requests by deadline, as vLLM does."""

    queued: list[float | None] = field(default_factory=list)

    def waiting_before(self, deadline: float | None) -> int:
        return waiting_ahead(self.queued, self.waiting, deadline)


def test_on_a_device_of_its_own_only_requests_due_first_queue_ahead_where_the_engine_admits_by_deadline() -> None:
    """A full vLLM engine (a GPU: each variant its own device) with eight requests waiting, due in 50 s: a request
    due in 10 s is admitted ahead of them, one due in 60 s after them."""
    teacher = _AdmitsByDeadline(**vars(_variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900)))
    teacher.running, teacher.waiting, teacher.queued = 8, 8, [50.0] * 8
    router = Router(sharing="own", clock=lambda: 0.0)
    tight = router.choose([teacher], Budget(latency_ms=10_000), 20, 100)[1]
    loose = router.choose([teacher], Budget(latency_ms=60_000), 20, 100)[1]
    # eight prefills ahead, and a slot later: a batch's worth (8 rows) of its 100 steps at 80 ms
    assert loose.predicted_ms - tight.predicted_ms == pytest.approx(8 * 15 + 8 / 8 * 100 * 80, abs=0.1)


def test_profiles_follow_what_the_engine_measures() -> None:
    profile = CostProfile(prefill_overhead_ms=5, prefill_per_token_ms=1, step_b1_ms=10, step_b8_ms=20, load_ms=0)
    for _ in range(30):
        profile.observe_step(1, 0.030)  # the machine is 3x slower than the manifest said
    assert profile.step_ms(1) == pytest.approx(30, rel=0.05)
    assert profile.step_ms(8) == pytest.approx(60, rel=0.05)  # not yet seen: scaled with it
    for _ in range(100):  # then batches of 8 cost 80 ms, and batches of one still 30 ms
        profile.observe_step(8, 0.080)
        profile.observe_step(1, 0.030)
    assert profile.step_ms(1) == pytest.approx(30, rel=0.05)
    assert profile.step_ms(8) == pytest.approx(80, rel=0.05)
    assert profile.step_ms(4) == pytest.approx(30 + 3 / 7 * 50, rel=0.05)
    for tokens, ms in [(16, 40), (256, 280)] * 40:  # prefill: 24 ms + 1 ms per token
        profile.observe_prefill(tokens, ms / 1000)
    assert profile.ttft_ms(128) == pytest.approx(152, rel=0.05)


def test_a_spike_moves_the_profile_a_little_and_a_lasting_change_all_the_way() -> None:
    """A shared host's steps spike; one spike at full weight would raise every plan by a fifth and condemn rows
    that can still make their deadlines."""
    profile = CostProfile(prefill_overhead_ms=5, prefill_per_token_ms=1, step_b1_ms=40, step_b8_ms=50, load_ms=0)
    profile.observe_step(1, 0.080)  # one step at twice its time
    assert profile.step_ms(1) == pytest.approx(40 * (1 + 0.2 * OUTLIER_BOUND), rel=0.01)
    for _ in range(30):  # the machine settles at 1.6x: learned within a few dozen steps
        profile.observe_step(1, 0.064)
    assert profile.step_ms(1) == pytest.approx(64, rel=0.02)
    profile.observe_prefill(128, 1.0)  # a prefill stalled 7x its usual time
    assert profile.ttft_ms(128) == pytest.approx(133 * (1 + 0.2 * OUTLIER_BOUND), rel=0.02)


def test_a_prediction_driven_below_zero_by_its_tilt_still_learns_back() -> None:
    """The bound is against the measured figure as well as the prediction: a tilt learned from long prompts
    can take a short prompt's prediction below zero, and a bound of nothing would keep it there."""
    profile = CostProfile(prefill_overhead_ms=5, prefill_per_token_ms=1, step_b1_ms=40, step_b8_ms=50, load_ms=0)
    profile.prefill_tilt = 0.6  # the 16-token prefill now predicts below zero (shown as 0.1 ms)
    assert profile.ttft_ms(16) == pytest.approx(0.1)
    for _ in range(50):
        profile.observe_prefill(16, 0.021)
    assert profile.ttft_ms(16) == pytest.approx(21, rel=0.05)


def test_budgets_parse_from_headers_or_body_and_reject_nonsense() -> None:
    default = Budget(latency_ms=5000)
    parsed = parse_budget({"x-latency-budget-ms": "800"}, {"latency_budget_ms": 100, "min_quality": "high"}, default)
    assert (parsed.latency_ms, parsed.max_ppl_ratio) == (800, 1.02)
    assert parse_budget({}, None, default) == default
    assert parse_budget({"x-min-quality": "1.2"}, None, default).max_ppl_ratio == 1.2
    assert parse_budget({"x-min-quality": "any"}, None, default).max_ppl_ratio == math.inf
    for headers, match in (
        ({"x-latency-budget-ms": "-5"}, "positive"),
        ({"x-latency-budget-ms": "soon"}, "positive"),
        ({"x-memory-budget-mb": "0"}, "positive"),
        ({"x-min-quality": "excellent"}, "tier"),
        ({"x-min-quality": "0.5"}, ">= 1"),
    ):
        with pytest.raises(BudgetError, match=match):
            parse_budget(headers, None, default)
    with pytest.raises(BudgetError, match="unknown slimserve field"):
        parse_budget({}, {"deadline": 3}, default)


# ---- the server, with real tiny variants of one family ------------------------------------------------


def test_on_shared_cores_work_due_earlier_runs_first() -> None:
    now = time.perf_counter()
    tight = Budget(latency_ms=1200)  # 40 tokens on int8: 15 ms prefill + 40 x 25 ms, due in 1200 ms
    # the teacher's running request has a minute to spare: under EDF it waits, int8 serves the tight one
    relaxed = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=1, pending=[(now + 60, 100)])
    assert edf_plan([relaxed, INT8], INT8, 20, 40, 1200).finish_ms == pytest.approx(1015)
    assert Router().choose([relaxed, INT8], tight, 20, 40)[1].budget_met
    # one due in a second must run its 20 steps (800 ms) first: int8's request cannot finish in time
    urgent = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=1, pending=[(now + 1.0, 20)])
    assert edf_plan([urgent, INT8], INT8, 20, 40, 1200).finish_ms == pytest.approx(15 + 800 + 1000)
    assert not Router().choose([urgent, INT8], tight, 20, 40)[1].budget_met
    # no budget: it advances at the round-robin pace (one 40 ms + 25 ms round per token, due in 3.25 s)
    best_effort = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=1)
    assert edf_plan([best_effort, INT8], INT8, 20, 40, 1200).finish_ms == pytest.approx(1015)
    assert edf_plan([best_effort, INT8], INT8, 20, 40, 5000).finish_ms == pytest.approx(15 + 50 * 40 + 1000)
    # one past saving yields, but still steps once a second: about one 40 ms step by the deadline 1.2 s out
    hopeless = _variant("teacher", step_ms=40, ppl_ratio=1.0, memory_mb=900, running=1, pending=[(now + 0.1, 100)])
    assert edf_plan([hopeless, INT8], INT8, 20, 40, 1200).finish_ms == pytest.approx(1015 + 40 * 1.2, rel=1e-3)
    # on a device share of its own (vLLM), only the variant's own batch counts
    assert Router(sharing="own").choose([urgent, INT8], tight, 20, 40)[1].budget_met
    assert deadline_harm(urgent, 20) == 0


def test_a_request_that_stopped_early_is_compared_with_the_prediction_for_its_own_tokens() -> None:
    """20 of 100 tokens (EOS came early): its prefill in full and a fifth of its steps, not the whole
    prediction, or every short answer would look faster than predicted."""
    router = Router()
    decision = router.choose([INT4], Budget(latency_ms=10_000), 20, 100)[1]
    first = decision.first_token_ms["int4"]
    assert 0 < first < decision.predicted_ms
    expected = first + (decision.predicted_ms - first) * 20 / 100
    assert decision.expected_ms(20) == pytest.approx(expected)
    router.observe(decision, expected, tokens=20)
    assert router.calibration == pytest.approx(1.0)
    router.observe(decision, 2 * decision.predicted_ms)  # full length: against the whole prediction
    assert router.calibration == pytest.approx(1.0 + router.calibration_smoothing * (2.0 - 1.0))


def test_while_the_calibration_says_cores_are_busy_load_moves_only_to_variants_cheaper_at_capacity() -> None:
    """Calibrated at 1.5 (requests take longer than profiled: load the profiles do not see), the teacher no
    longer fits the budget, and a variant faster alone does. Moving there spends the short
    cores if that variant serves a row at capacity at a higher cost than the teacher: the router keeps the
    teacher, and its outcome still calibrates. Where the faster variant is cheaper at capacity, it moves."""

    def batching(name: str, one_row_ms: float, eight_rows_ms: float, ppl_ratio: float) -> Described:
        profile = CostProfile(5, 0.5, step_b1_ms=one_row_ms, step_b8_ms=eight_rows_ms, load_ms=0)
        return Described(name, profile, ppl_ratio, memory_mb=500)

    teacher = batching("teacher", 40, 48, 1.0)  # 6 ms a row at eight rows
    dear = batching("int4", 20, 80, 1.09)  # 10 ms a row at eight rows
    cheap = batching("int4", 20, 32, 1.09)  # 4 ms a row at eight rows
    budget = Budget(latency_ms=5_000)  # teacher alone: 15 + 100 * 40 ms; int4 alone: 15 + 100 * 20 ms
    for family, expected in (([teacher, dear], "teacher"), ([teacher, cheap], "int4")):
        router = Router()
        router.calibration = 1.5
        decision = router.choose(family, budget, 20, 100)[1]
        assert decision.variant == expected
        assert decision.candidates["teacher"] > 5_000 >= decision.candidates["int4"]
        assert decision.teaches
    kept = Router()
    kept.calibration = 1.5
    order, decision = kept.choose([teacher, dear], budget, 20, 100)
    assert decision.budget_met is False and "busy cores" in decision.reason
    assert [c.name for c in order] == ["teacher", "int4"]  # the variant set aside is the last fallback
    kept.observe(decision, 4_015)  # as the profiles predicted: the calibration comes down
    assert kept.calibration < 1.5
    # uncalibrated, the teacher fits and serves; on a device of its own the rule does not apply
    assert Router().choose([teacher, dear], budget, 20, 100)[1].variant == "teacher"
    own = Router(sharing="own")
    own.calibration = 1.5
    assert own.choose([teacher, dear], budget, 20, 100)[1].variant == "int4"
    # the host slower than profiled, and the teacher's live profile has learned it: the calibration stays
    # within a prediction's noise, the teacher misses and the variant faster alone is open
    slow_host = Router()
    slow_host.calibration = BUSY_CALIBRATION
    slow_teacher = batching("teacher", 40, 48, 1.0)
    slow_teacher.profile.step_scale = 1.3
    decision = slow_host.choose([slow_teacher, dear], budget, 20, 100)[1]
    assert (decision.variant, decision.budget_met) == ("int4", True)
