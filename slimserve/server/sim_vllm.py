"""vLLM's engine on the simulator's virtual clock: a step as vLLM's V1 scheduler (`v1/core/sched/scheduler.py`)
builds it under `scheduling_policy="priority"`, with every forward replaced by its profile's time.

Each step, the running requests go first, in the order they were admitted: a request still in its prompt
takes its next chunk (as much of the rest as the token budget leaves), one that decodes takes one token.
Then waiting requests are admitted in priority order, slimserve's deadline first (`deadline_priority`;
no deadline last, ties by arrival), while the token budget (`max_num_batched_tokens`) and the batch limit
(`max_num_seqs`) allow, each prompt's first chunk in the same step. So a request arriving while others
decode gets its first token after one mixed step, and no rows are stepped apart for urgency: every running
row decodes every step. A step costs its profile's decode step at the rows that decode, plus, per prompt
chunk it carries, that chunk's share of its whole prompt's prefill. Not modelled: the KV cache (vLLM
preempts the lowest priority when it runs out; the profiled variants never fill theirs at these loads).

On a host with few cores each vLLM engine runs in its own process, and the simplest honest model is that an
engine step still takes a turn of the host, one at a time: the host's next turn goes to the busy vLLM engine
that has waited longest (round robin, as the OS shares the cores), not by deadline, since no slimserve
scheduler orders vLLM engines' steps. (A grid mixing the two backends would run vLLM's steps first.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from slimserve.server.profile import Sharing
from slimserve.server.scheduler import Turn
from slimserve.server.sim_engine import SimEngine, SimJob, Variant
from slimserve.server.vllm_priority import waiting_ahead


def priority(job: SimJob) -> tuple[float, float]:
    """vLLM's waiting order: its priority (the deadline; none last), then arrival."""
    return (math.inf if job.deadline is None else job.deadline, job.submitted_at)


class VllmSimEngine(SimEngine):
    """One variant's vLLM engine: continuous batching with chunked prefill inside a token budget."""

    sharing: Sharing = "round_robin"

    def __init__(self, variant: Variant, noise: Callable[[], float] = lambda: 1.0) -> None:
        super().__init__(variant, noise)
        self.batch: list[SimJob] = []
        """Running requests in order of admission, those still in their prompt included."""
        self.computed: dict[SimJob, int] = {}
        """Prompt tokens in each running request's cache."""
        self.began: dict[SimJob, float] = {}
        """When each request's first chunk was scheduled: its prefill time runs from there to its token."""

    def rows(self) -> list[SimJob]:
        return list(self.batch)

    def deadlines(self) -> list[tuple[float | None, int]]:
        """Every request in flight, waiting ones included, as `VllmEngine.deadlines` reports them to the router:
        slimserve does not see which of its requests vLLM has admitted."""
        return [(j.deadline, j.steps_left) for j in [*self.batch, *self.queue]]

    def waiting_before(self, deadline: float | None) -> int:
        """As `VllmEngine.waiting_before` sees it: of the requests without a token yet, those due no later,
        at most as many as wait (slimserve does not see which of them vLLM has admitted)."""
        unstarted = [job.deadline for job in [*self.batch, *self.queue] if job.generated == 0]
        return waiting_ahead(unstarted, len(self.queue), deadline)

    def turn(self, now: float) -> Turn | None:
        if not self.batch and not self.queue:
            return None
        step_s = self.profile.step_ms(len(self.batch)) / 1000
        return Turn(step_s, prefill=True, cost_s=step_s)  # every vLLM engine is due: the longest-waiting steps

    def plan(self) -> tuple[list[tuple[SimJob, int]], list[SimJob]]:
        """One step: the prompt chunks it carries (request, tokens) and the rows that decode a token."""
        budget = self.variant.max_num_batched_tokens
        chunks: list[tuple[SimJob, int]] = []
        decoding: list[SimJob] = []
        for job in self.batch:
            if budget <= 0:
                break
            left = job.prompt_tokens - self.computed[job]
            if left > 0:
                chunks.append((job, min(left, budget)))
                budget -= chunks[-1][1]
            else:
                decoding.append(job)
                budget -= 1
        admitted = len(self.batch)
        for job in sorted(self.queue, key=priority):
            if budget <= 0 or admitted >= self.variant.max_batch_size:
                break
            chunks.append((job, min(job.prompt_tokens, budget)))
            budget -= chunks[-1][1]
            admitted += 1
        return chunks, decoding

    def step(self, now: float) -> tuple[float, list[SimJob]]:
        chunks, decoding = self.plan()
        if not chunks and not decoding:
            return 0.0, []
        cost_ms = self.truth.step_ms(len(decoding)) if decoding else 0.0
        cost_ms += sum(self.truth.ttft_ms(job.prompt_tokens) * n / job.prompt_tokens for job, n in chunks)
        spent = cost_ms / 1000 * self.noise()
        end = now + spent
        if decoding and not chunks:  # a decode step's own time: one that carries prompts says little of it
            self.profile.observe_step(len(decoding), spent)
        finished: list[SimJob] = []
        for job in decoding:
            job.generated += 1
            job.last_token_at = end
            if job.generated >= job.max_tokens:
                job.finished_at = end
                finished.append(job)
        for job, n in chunks:
            if job not in self.computed:  # admitted this step
                self.queue.remove(job)
                self.batch.append(job)
                self.computed[job], self.began[job] = 0, now
            self.computed[job] += n
            if self.computed[job] >= job.prompt_tokens:  # its last chunk samples its first token
                self.profile.observe_prefill(job.prompt_tokens, end - self.began.pop(job))
                job.generated, job.last_token_at = 1, end
                if job.generated >= job.max_tokens:
                    job.finished_at = end
                    finished.append(job)
        for job in finished:
            self.batch.remove(job)
            del self.computed[job]
        return spent, finished
