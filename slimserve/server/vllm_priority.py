"""slimserve's deadlines as vLLM's request priorities (`scheduling_policy="priority"`): how a routed request
ranks in vLLM's queue, and so which waiting requests vLLM admits before a new one. Apart from `vllm_engine`
because the simulator's vLLM engine and the router's tests rank the same way without loading vLLM."""

from __future__ import annotations

import math
from collections.abc import Sequence

NO_DEADLINE_PRIORITY = 2**62
"""vLLM priority of a request without a latency budget: after every request that has one."""


def deadline_priority(deadline: float | None, epoch: float) -> int:
    """vLLM's request priority (lower is scheduled first) for a deadline in `time.perf_counter()` seconds:
    milliseconds after `epoch`, so an earlier deadline always ranks first; no deadline ranks last."""
    if deadline is None:
        return NO_DEADLINE_PRIORITY
    return max(0, int((deadline - epoch) * 1000))


def waiting_ahead(unstarted: Sequence[float | None], waiting: int, deadline: float | None) -> int:
    """Sequences vLLM admits before a new one due at `deadline`: of those with no token yet (`unstarted`, their
    deadlines: slimserve does not see which of them vLLM has admitted), the ones due no later, since the
    priority is the deadline (`deadline_priority`; none last); at most the `waiting` vLLM counts."""
    due = math.inf if deadline is None else deadline
    return min(waiting, sum(1 for d in unstarted if (math.inf if d is None else d) <= due))
