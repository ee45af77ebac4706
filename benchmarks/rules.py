"""Each scheduling and routing rule, switched off: what `benchmarks/simulate.py --ablate` compares the router
against, so a rule stays only where the simulator shows it helps.

A rule is switched off by patching it to its neutral form for the length of a `with` block (the constant
that sizes it set to the value that makes it do nothing, or the method replaced by the plain choice it
refines). Patching, not flags in the product: the product keeps one way of doing each thing, and a rule
the evidence removes is deleted from the code, and from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

from slimserve.server import predictions, router, scheduler, simulator


@dataclass(frozen=True)
class Rule:
    name: str
    what: str
    """The rule, as a reader of the code knows it."""
    off: Callable[[], contextlib.AbstractContextManager[Any]]
    """Patches that switch it off."""


def _constant(name: str, value: Any, *modules: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """`name` set to `value` in each module that holds its own binding of it."""

    def patched() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for module in modules:
            stack.enter_context(mock.patch.object(module, name, value))
        return stack

    return patched


def _round_robin(turns: Any, last_ran: Any, now: float) -> int:
    """Turns between engines without deadlines: the engine that has waited longest."""
    return min(range(len(turns)), key=lambda i: last_ran[i])


def _no_harm(plan: Callable[..., predictions.Plan]) -> Callable[..., predictions.Plan]:
    def planned(*args: Any, **kwargs: Any) -> predictions.Plan:
        return dataclasses.replace(plan(*args, **kwargs), harm=0)

    return planned


RULES = (
    Rule(
        "step-apart",
        "urgent rows step apart from the batch (Scheduler.schedule_decode)",
        lambda: mock.patch.object(scheduler.Scheduler, "schedule_decode", lambda self, main, apart, now: None),
    ),
    Rule(
        "jump",
        "a short prompt due sooner is prefilled between another prompt's chunks (Scheduler.ahead_of)",
        lambda: mock.patch.object(scheduler.Scheduler, "ahead_of", lambda self, *a, **k: None),
    ),
    Rule("safety", "remaining steps planned at SAFETY x their predicted time", _constant("SAFETY", 1.0, scheduler)),
    Rule(
        "background",
        "past-saving rows step only every BACKGROUND_S (else with everyone)",
        _constant("BACKGROUND_S", 1e-6, scheduler, predictions),
    ),
    Rule(
        "edf-turns",
        "between engines, the one due first by deadline takes the turn (next_turn)",
        _constant("next_turn", _round_robin, simulator),
    ),
    Rule(
        "calibration",
        "predictions scaled by the observed ratio of actual latency to the profiles' prediction (Router.observe)",
        lambda: mock.patch.object(router.Router, "observe", lambda self, *a, **k: None),
    ),
    Rule(
        "workhorse",
        "fallbacks and equals ranked by their per-request cost at the batch they would join (workhorse_ms)",
        _constant("workhorse_ms", lambda target, prompt_tokens, max_tokens: 0.0, router),
    ),
    Rule(
        "capacity",
        "under a calibration above BUSY_CALIBRATION, a request the best variant would miss moves only to variants "
        "as cheap per row at capacity (Router._no_dearer_at_capacity)",
        lambda: mock.patch.object(router.Router, "_no_dearer_at_capacity", lambda self, group, *a, **k: (group, None)),
    ),
    Rule(
        "harm",
        "a variant whose admission would push running requests over their budgets ranks lower (edf_plan.harm)",
        lambda: mock.patch.object(router, "edf_plan", _no_harm(predictions.edf_plan)),
    ),
)
"""Every rule the simulator can switch off, by name."""

BY_NAME = {rule.name: rule for rule in RULES}
