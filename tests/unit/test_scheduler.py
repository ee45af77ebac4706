"""The scheduler's plans, on a fake clock and plain records: no model, no threads, no wall clock."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from slimserve.server.profile import CostProfile
from slimserve.server.scheduler import (
    BACKGROUND_S,
    PREFILL_TOKENS,
    SAFETY,
    Scheduler,
    savable,
)

NOW = 1000.0


@dataclass(eq=False)  # identity, as the engine's sequences
class Job:
    prompt_tokens: int
    max_tokens: int
    deadline: float | None
    generated: int = 0
    submitted_at: float = NOW
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False

    @property
    def steps_left(self) -> int:
        return self.max_tokens - self.generated


def job(max_tokens: int, due_in_s: float | None, prompt_tokens: int = 3, generated: int = 0) -> Job:
    return Job(prompt_tokens, max_tokens, None if due_in_s is None else NOW + due_in_s, generated=generated)


def scheduler(profile: CostProfile, max_batch_size: int = 16) -> Scheduler[Job]:
    return Scheduler(max_batch_size, profile)


def test_savable_is_the_work_alone_against_the_time_left() -> None:
    assert savable(1.0, 10, 0.1) and not savable(0.99, 10, 0.1)
    assert not savable(1.0, 10, 0.1, first_s=0.05)


def test_waiting_prompts_join_as_free_slots_allow_oldest_first_whatever_the_running_rows_deadlines() -> None:
    """Admission fills free slots in arrival order; a tight running row does not hold budgeted prompts
    back (that wait lowered attainment on the simulator), and a turn prefills what fits its chunk budget."""
    # prefill: 10 ms a prompt token; steps: 50 ms
    plan = scheduler(CostProfile(0.0, 10.0, step_b1_ms=50.0, step_b8_ms=50.0, load_ms=0.0), max_batch_size=4)
    rows = [job(20, 1.1)]  # 20 steps need 1 s, 1.25 s with SAFETY: no time to spare
    short = job(40, 60.0)  # a 30 ms prefill
    long = job(40, 60.0, prompt_tokens=60)  # a 600 ms prefill
    unbudgeted, urgent = job(40, None), job(4, 0.5)
    waiting = [short, long, unbudgeted, urgent]
    assert plan.admissible(waiting, rows) == [short, long, unbudgeted]  # three free slots
    assert plan.admissible(waiting, []) == waiting
    turn = plan.turn([long, short], rows, None, NOW)  # the step and the chunks the turn would run
    assert turn is not None and turn.cost_s == pytest.approx(0.05 + 0.6 + 0.03)
    prefill = plan.schedule_prefill([long, short], rows, None, NOW)
    assert prefill.start == [long, short] and prefill.seconds == pytest.approx(0.63)


def test_a_row_the_batch_pace_would_miss_but_its_own_steps_can_save_is_not_past_saving() -> None:
    """The engine's urgency follows `schedule_decode`: a running row whose remaining steps no longer fit at
    its batch's pace, but do stepped apart, keeps a latest start and its deadline (EDF turns), instead of
    counting as past saving (background turns only); a row that not even its own steps can save is."""
    plan = scheduler(CostProfile(1.0, 0.01, step_b1_ms=20.0, step_b8_ms=160.0, load_ms=0.0))
    # five rows step at 100 ms: 10 steps need 1 s in the batch, 0.2 s alone
    tight = job(10, 0.5)
    rows = [job(40, 60.0) for _ in range(4)] + [tight]
    turn = plan.turn([], rows, None, NOW)
    assert turn is not None and not turn.past_saving and turn.deadline == tight.deadline
    assert turn.latest_start is not None and turn.latest_start == pytest.approx(tight.deadline - 0.2 * SAFETY)
    assert plan.schedule_decode(rows[:4], [tight], NOW) == [tight]  # stepped apart
    rows[-1] = job(10, 0.1)  # 0.2 s of steps even alone: past saving
    turn = plan.turn([], rows, None, NOW)
    assert turn is not None and turn.past_saving and turn.deadline is not None and turn.deadline > NOW + 50
    assert plan.latest_start(rows[-1], 5, NOW) == math.inf
    assert plan.schedule_decode(rows, [], NOW) is None  # nothing urgent that can be saved: one batch


def test_rows_due_before_an_urgent_row_step_with_it_and_the_hopeless_ride_along_after_background_s() -> None:
    plan = scheduler(CostProfile(1.0, 0.01, step_b1_ms=20.0, step_b8_ms=160.0, load_ms=0.0))
    urgent = job(10, 0.9)  # 1 s at the batch's 100 ms, 0.2 s alone
    sooner = job(2, 0.8)  # not urgent, but due before it
    loose = job(10, 60.0)
    hopeless = job(50, 0.1)
    hopeless.last_token_at = NOW - BACKGROUND_S
    idle = job(10, None)
    idle.last_token_at = NOW  # stepped just now: it waits
    apart = plan.schedule_decode([loose, urgent, sooner, hopeless, idle], [], NOW)
    assert apart == [urgent, sooner, hopeless]
    # once the whole batch's pace makes its deadline, it rejoins the batch
    assert plan.schedule_decode([loose, hopeless, idle], [job(10, 60.0)], NOW) is None


def test_a_one_chunk_prompt_due_sooner_jumps_the_chunks_of_a_prompt_under_way() -> None:
    plan = scheduler(CostProfile(0.0, 1.0, step_b1_ms=20.0, step_b8_ms=40.0, load_ms=0.0))
    under_way = job(10, 60.0, prompt_tokens=3 * PREFILL_TOKENS)
    tight = job(5, 2.0, prompt_tokens=40)
    long_tight = job(5, 2.0, prompt_tokens=PREFILL_TOKENS + 1)
    prefill = plan.schedule_prefill([long_tight, tight], [under_way], (under_way, PREFILL_TOKENS), NOW)
    assert prefill.jump is tight and not prefill.chunk and prefill.seconds == pytest.approx(0.04)
    alone = plan.schedule_prefill([], [under_way], (under_way, PREFILL_TOKENS), NOW)
    assert alone.chunk and alone.start == [] and alone.seconds == pytest.approx(PREFILL_TOKENS / 1000)
    # its last chunk: then waiting prompts start in the same turn while the chunk leaves room
    last = plan.schedule_prefill([job(5, None, prompt_tokens=60)], [under_way], (under_way, 2 * PREFILL_TOKENS), NOW)
    assert last.chunk and last.start == []  # 128 + 60 > PREFILL_TOKENS
    assert plan.schedule_prefill([], [], None, NOW).empty and plan.turn([], [], None, NOW) is None


def test_a_turns_output_teaches_the_profile_its_plans_read() -> None:
    """Steps and prefills that ran slower than profiled make the next plans predict them slower; a
    scheduler without a profile takes an output without failing."""
    plan = scheduler(CostProfile(1.0, 0.01, step_b1_ms=20.0, step_b8_ms=40.0, load_ms=0.0))
    step_before, prefill_before = plan.step_s(4), plan.prefill_s(100, 100)
    for _ in range(20):
        plan.update_from_output(rows=4, step_s=3 * step_before, prompt_tokens=100, prefill_s=3 * prefill_before)
    assert plan.step_s(4) > 2 * step_before
    assert plan.prefill_s(100, 100) > 2 * prefill_before
    assert plan.profile is not None and plan.profile.observations == 40
    bare = Scheduler[Job](16)
    bare.update_from_output(rows=1, step_s=0.1)
    assert bare.step_s(1) == bare.step_s(8)
