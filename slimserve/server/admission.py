"""How long a full engine takes to make room: the Retry-After of a 429, from the queue's real work."""

from __future__ import annotations

import heapq


def drain_seconds(running_s: list[float], queued_s: list[float], slots: int, count: int) -> float:
    """Seconds until `count` of an engine's sequences have finished.

    `running_s`: seconds each running sequence has left; `queued_s`: seconds of work of each queued one
    (prefill and every token), in queue order, each starting when a batch slot frees. A client told to
    retry after a fixed second on a server whose queue needs a minute retried 60 times for nothing."""
    if count <= 0:
        return 0.0
    free = sorted(running_s) + [0.0] * max(0, slots - len(running_s))  # when each slot frees
    heapq.heapify(free)
    finishes = list(running_s)
    for work in queued_s:
        end = heapq.heappop(free) + work
        finishes.append(end)
        heapq.heappush(free, end)
    if not finishes:
        return 0.0
    return sorted(finishes)[min(count, len(finishes)) - 1]
