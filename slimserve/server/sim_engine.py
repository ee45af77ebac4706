"""What the simulator serves on: a variant, a request as an engine sees it, and slimserve's own engine on the
virtual clock (`SimEngine`, what `TransformersEngine` does with its scheduler's plans); vLLM's engine is
`sim_vllm.VllmSimEngine`. No torch and no threads."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from slimserve.server.profile import CostProfile, Sharing
from slimserve.server.router import Decision
from slimserve.server.scheduler import Scheduler, Turn, next_chunk_tokens, prefill_chunks


@dataclass(frozen=True)
class Variant:
    """A variant as the simulator serves it: its cost profile and its quality."""

    name: str
    profile: CostProfile
    ppl_ratio: float
    """Held-out perplexity as a ratio to the teacher's (1.0: the teacher)."""
    memory_mb: float = 0.0
    max_batch_size: int = 16
    engine: str = "transformers"
    """Whose engine serves it: `transformers` (`SimEngine`) or `vllm` (`sim_vllm.VllmSimEngine`)."""
    max_num_batched_tokens: int = 2048
    """vLLM only: the prompt and decode tokens one engine step carries at most (vLLM's token budget)."""


@dataclass(eq=False)
class SimJob:
    """A request as the scheduler sees it (`scheduler.Job`)."""

    prompt_tokens: int
    max_tokens: int
    deadline: float | None
    submitted_at: float
    budget_ms: float
    decision: Decision | None = None
    variant: str = ""
    generated: int = 0
    last_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def steps_left(self) -> int:
        return self.max_tokens - self.generated

    @property
    def done(self) -> bool:
        return self.finished_at is not None


class SimEngine:
    """One variant's engine on the virtual clock: what `TransformersEngine` does with its scheduler's plans,
    with every forward replaced by its profile's time. Also the router's `Candidate`."""

    sharing: Sharing = "deadline"

    def __init__(self, variant: Variant, noise: Callable[[], float] = lambda: 1.0) -> None:
        self.variant = variant
        self.truth = variant.profile
        """What turns cost (times `noise`); `profile` is the live copy the router and scheduler read."""
        self.profile = dataclasses.replace(variant.profile)
        self.noise = noise
        self.scheduler: Scheduler[SimJob] = Scheduler(variant.max_batch_size, self.profile)
        self.queue: list[SimJob] = []
        self.main: list[SimJob] = []
        self.apart: list[SimJob] = []
        self.partial: tuple[SimJob, int] | None = None

    # ---- the router's view (`predictions.Candidate`) ----------------------------------------------

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def memory_mb(self) -> float:
        return self.variant.memory_mb

    @property
    def ppl_ratio(self) -> float | None:
        return self.variant.ppl_ratio

    @property
    def max_batch_size(self) -> int:
        return self.variant.max_batch_size

    @property
    def resident(self) -> bool:
        return True

    @property
    def available(self) -> bool:
        return True

    @property
    def running(self) -> int:
        return len(self.rows())

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def deadlines(self) -> list[tuple[float | None, int]]:
        return [(j.deadline, j.steps_left) for j in self.rows()]

    def waiting_before(self, deadline: float | None) -> int:
        """All of its queue: the scheduler admits first come first served (`Scheduler.admissible`)."""
        return len(self.queue)

    def rows(self) -> list[SimJob]:
        return [*self.main, *self.apart, *([self.partial[0]] if self.partial is not None else [])]

    # ---- turns ------------------------------------------------------------------------------------

    def turn(self, now: float) -> Turn | None:
        """How urgently it needs the host's next turn (`next_turn`); None with nothing to do."""
        return self.scheduler.turn(self.queue, self.rows(), self.partial, now)

    def step(self, now: float) -> tuple[float, list[SimJob]]:
        """Carry out one turn from `now`: seconds it took and the requests it finished."""
        plan = self.scheduler.schedule_prefill(self.queue, self.rows(), self.partial, now)
        spent, finished = 0.0, []
        if plan.jump is not None:
            self.queue.remove(plan.jump)
            spent += self._prefill_s(plan.jump.prompt_tokens, plan.jump.prompt_tokens, last=True)
            finished += self._first_token(plan.jump, now + spent)
        if plan.chunk and self.partial is not None:
            job, done = self.partial
            chunk = next_chunk_tokens(job.prompt_tokens, done)
            spent += self._prefill_s(job.prompt_tokens, chunk, last=done + chunk >= job.prompt_tokens)
            self.partial = (job, done + chunk)
            if done + chunk >= job.prompt_tokens:
                self.partial = None
                finished += self._first_token(job, now + spent)
        for job in plan.start:
            self.queue.remove(job)
            first = prefill_chunks(job.prompt_tokens)[0]
            spent += self._prefill_s(job.prompt_tokens, first, last=first >= job.prompt_tokens)
            if first < job.prompt_tokens:
                self.partial = (job, first)
            else:
                finished += self._first_token(job, now + spent)
        apart = self.scheduler.schedule_decode(self.main, self.apart, now + spent)
        if apart is None:
            self.main, self.apart = [*self.main, *self.apart], []
            stepped = self.main
        else:
            chosen = set(apart)
            everyone = [*self.main, *self.apart]
            self.main = [j for j in everyone if j not in chosen]
            self.apart = [j for j in everyone if j in chosen]
            stepped = self.apart
        if stepped:
            step_s = self.truth.step_ms(len(stepped)) / 1000 * self.noise()
            self.scheduler.update_from_output(rows=len(stepped), step_s=step_s)
            spent += step_s
            for job in stepped:
                job.generated += 1
                job.last_token_at = now + spent
                if job.generated >= job.max_tokens:
                    job.finished_at = now + spent
                    finished.append(job)
            self.main = [j for j in self.main if not j.done]
            self.apart = [j for j in self.apart if not j.done]
        return spent, finished

    def _prefill_s(self, prompt_tokens: int, chunk_tokens: int, last: bool) -> float:
        """A chunk's share of the whole prefill's true cost; the live profile learns a whole prefill once, at
        its last chunk, as the engine does."""
        whole_s = self.truth.ttft_ms(prompt_tokens) / 1000 * self.noise()
        if last:
            self.scheduler.update_from_output(prompt_tokens=prompt_tokens, prefill_s=whole_s)
        return whole_s * chunk_tokens / max(prompt_tokens, 1)

    def _first_token(self, job: SimJob, at: float) -> list[SimJob]:
        """The prefill's token: the job joins the batch, or is done if it wanted one token."""
        job.generated, job.last_token_at = 1, at
        if job.generated >= job.max_tokens:
            job.finished_at = at
            return [job]
        self.main.append(job)
        return []
