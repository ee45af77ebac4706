"""What happens around a request's life on a tiny real model: a queue that is full, or a request too large
for it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from slimserve.models import load_variant
from slimserve.server.admission import drain_seconds
from slimserve.server.app import create_app
from slimserve.server.engine import EngineBusyError, EngineState, TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import SamplingParams

MODEL = "tiny-llama"


class HeldCompute:
    """A compute thread that runs no turn but the one that stops an engine: what is admitted stays put."""

    def __init__(self) -> None:
        self.engines: list[TransformersEngine] = []

    def attach(self, engine: TransformersEngine) -> None:
        self.engines.append(engine)

    def wake(self) -> None:
        for engine in self.engines:
            if engine.state is not EngineState.READY:
                engine.step()


def _ready(client: TestClient) -> None:
    for _ in range(400):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/health").json())


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital", "max_tokens": 200, "ignore_eos": True} | fields


# ---- admission ----------------------------------------------------------------------------------------


def _held_engine(variant_dir: Path, **limits: int) -> TransformersEngine:
    engine = TransformersEngine(
        lambda: load_variant(variant_dir, dtype="fp32"), MODEL, ServerMetrics(), compute=HeldCompute(), **limits
    )
    return engine


def test_admission_counts_every_admitted_sequence_against_running_plus_waiting(tiny_variant_dir: Path) -> None:
    """With 4 slots and 4 waiting places, 8 of 40 requests get in (the queue used to hold 4 of them)."""
    engine = _held_engine(tiny_variant_dir, max_batch_size=4, max_waiting=4)
    engine.start()
    assert engine.wait_ready(60)

    async def flood() -> tuple[int, int]:
        admitted = refused = 0
        for _ in range(40):
            try:
                engine.submit([5, 6, 7], SamplingParams(max_tokens=10))
                admitted += 1
            except EngineBusyError:
                refused += 1
        return admitted, refused

    try:
        assert asyncio.run(flood()) == (8, 32)
        assert engine.waiting == 8 and engine.running == 0
    finally:
        engine.shutdown(timeout=1)


def test_drain_seconds_frees_slots_in_order() -> None:
    # two slots: running rows end at 2 s and 5 s; queued work of 3 s and 1 s starts as they free
    assert drain_seconds([2.0, 5.0], [3.0, 1.0], slots=2, count=1) == 2.0
    assert drain_seconds([2.0, 5.0], [3.0, 1.0], slots=2, count=2) == 5.0  # the 3 s job ends at 5 too
    assert drain_seconds([2.0, 5.0], [3.0, 1.0], slots=2, count=4) == 6.0
    assert drain_seconds([], [4.0, 4.0, 4.0], slots=2, count=3) == 8.0  # the third waits for a slot
    assert drain_seconds([1.0], [], slots=4, count=0) == 0.0


def test_a_full_queue_is_429_with_its_drain_time_and_a_request_it_could_never_hold_is_400(
    tiny_variant_dir: Path,
) -> None:
    engine = _held_engine(tiny_variant_dir, max_batch_size=1, max_waiting=1)
    app = create_app([engine], engine.metrics)

    async def fill() -> None:
        engine.submit_many([([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))] * 2)

    with TestClient(app) as client:
        _ready(client)
        assert engine.profile is not None
        engine.profile.step_b1_ms = engine.profile.step_b8_ms = 50.0  # 200 tokens: 10 s a sequence
        too_large = client.post("/v1/completions", json=_body(prompt=["a", "b", "c"], max_tokens=4))
        client.portal.call(fill)
        busy = client.post("/v1/completions", json=_body(max_tokens=4))
    assert too_large.status_code == 400
    error = too_large.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "prompt"
    assert "more than the 2 this model serves at once" in error["message"]
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
    assert 10 <= int(busy.headers["retry-after"]) <= 12  # the first queued sequence's 10 s, not a blind 1
