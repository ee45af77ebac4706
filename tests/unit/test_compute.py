"""The compute thread's choice of which engine steps next (`scheduler.next_turn`)."""

from __future__ import annotations

from slimserve.server.scheduler import BACKGROUND_S, Turn, next_turn

NOW = 1000.0


def test_the_engine_due_first_by_deadline_steps_before_one_with_less_laxity() -> None:
    """A long request due in 10 s with 0.1 s to spare, a short one due in 4 s with 3 s to spare: the short
    one steps first (earliest deadline first, what the router's finish times assume); least laxity first
    would run the long one and hold the short one back to the edge of its budget."""
    long = Turn(step_s=0.05, latest_start=NOW + 0.1, deadline=NOW + 10)
    short = Turn(step_s=0.05, latest_start=NOW + 3, deadline=NOW + 4)
    assert next_turn([long, short], [NOW, NOW], now=NOW) == 1
    assert next_turn([short, long], [NOW, NOW], now=NOW) == 0


def test_prefills_without_a_budget_come_first_then_the_longest_waiting() -> None:
    tight = Turn(step_s=0.05, latest_start=NOW, deadline=NOW + 1)
    unbudgeted = Turn(step_s=0.05, prefill=True)
    stopping = Turn(step_s=0.0, prefill=True)
    assert next_turn([tight, unbudgeted], [NOW, NOW], now=NOW) == 1
    assert next_turn([unbudgeted, stopping, tight], [NOW, NOW - 1, NOW], now=NOW) == 1


def test_paced_work_steps_only_while_budgeted_work_can_wait() -> None:
    """A best-effort engine behind its round-robin pace steps before budgeted engines whose latest start
    is still ahead of that pace, and not once one of them is due."""
    relaxed = Turn(step_s=0.05, latest_start=NOW + 5, deadline=NOW + 8)
    best_effort = Turn(step_s=0.05, best_effort=True)
    assert next_turn([relaxed, best_effort], [NOW, NOW - 1], now=NOW) == 1
    urgent = Turn(step_s=0.05, latest_start=NOW - 0.5, deadline=NOW + 2)
    assert next_turn([urgent, best_effort], [NOW, NOW - 0.2], now=NOW) == 0
    # past saving: a step a second, after the budgeted engine's latest start
    hopeless = Turn(step_s=0.05, past_saving=True)
    assert next_turn([relaxed, hopeless], [NOW, NOW - 2 * BACKGROUND_S], now=NOW) == 1
    assert next_turn([urgent, hopeless], [NOW, NOW - 0.1], now=NOW) == 0


def test_paced_work_goes_ahead_only_when_its_whole_turn_fits_the_spare_time() -> None:
    """A past-saving engine due its background turn goes ahead of a budgeted engine with 0.2 s to spare only
    if the turn (a decode step, or a prefill chunk as well) ends by then: a 0.3 s chunk waits, and the
    budgeted engine steps meanwhile."""
    relaxed = Turn(step_s=0.05, latest_start=NOW + 0.2, deadline=NOW + 3)
    step_only = Turn(step_s=0.05, past_saving=True, cost_s=0.05)
    with_chunk = Turn(step_s=0.05, past_saving=True, cost_s=0.35)
    assert next_turn([relaxed, step_only], [NOW, NOW - 2 * BACKGROUND_S], now=NOW) == 1
    assert next_turn([relaxed, with_chunk], [NOW, NOW - 2 * BACKGROUND_S], now=NOW) == 0
    assert next_turn([with_chunk], [NOW - 2 * BACKGROUND_S], now=NOW) == 0  # alone: it runs
