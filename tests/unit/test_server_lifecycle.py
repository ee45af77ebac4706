"""What happens around a request's life on a tiny real model: a client that leaves, a server that shuts
down, a queue that is full or a request too large for it, a variant that failed to load."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from slimserve.models import LoadedVariant, load_variant
from slimserve.server.admission import drain_seconds
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import SamplingParams
from slimserve.server.serving_engine import EngineBusyError, EngineState
from tests import asgi

MODEL = "tiny-llama"


class HeldCompute:
    """A compute thread that runs no turn but the load-time warm-up's and the one that stops an engine: what
    is admitted stays put."""

    def __init__(self) -> None:
        self.engines: list[TransformersEngine] = []

    def attach(self, engine: TransformersEngine) -> None:
        self.engines.append(engine)
        while engine.state is EngineState.LOADING:  # its warm-up, after which it is READY
            engine.step()

    def wake(self) -> None:
        for engine in self.engines:
            if engine.state is not EngineState.READY:
                engine.step()


def _slow_loader(variant_dir: Path, step_s: float) -> Callable[[], LoadedVariant]:
    """The tiny model, each forward `step_s` slower: long enough generations to leave or shut down in."""

    def load() -> LoadedVariant:
        loaded = load_variant(variant_dir, dtype="fp32")
        forward = loaded.model.forward

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(step_s)
            return forward(*args, **kwargs)

        loaded.model.forward = slow
        return loaded

    return load


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital", "max_tokens": 200, "ignore_eos": True} | fields


async def _until(condition: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until `condition` holds (polled on the loop), or fail after `timeout_s`."""
    began = time.perf_counter()
    while not condition():
        if time.perf_counter() - began > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - began


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ---- a client that leaves ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "spec_version", "reports_leaving"),
    [(False, "2.3", True), (True, "2.3", True), (True, "2.3", False), (True, "2.4", False)],
    ids=["blocking", "stream", "stream-told-by-a-failed-write", "stream-asgi-2.4"],
)
def test_a_client_that_leaves_stops_its_generation_within_a_step(
    tiny_variant_dir: Path, stream: bool, spec_version: str, reports_leaving: bool
) -> None:
    """Without a pure ASGI middleware stack the blocking request never saw its client leave and ran to the end;
    a stream whose `send` failed while its generator waited at a `yield` ran on until garbage collection."""
    engine = TransformersEngine(_slow_loader(tiny_variant_dir, 0.02), MODEL, ServerMetrics())
    app = create_app([engine], engine.metrics)

    async def scenario() -> tuple[float, int]:
        call = asgi.start(app, "/v1/completions", _body(stream=stream), None, spec_version, reports_leaving)
        await _until(lambda: engine.running == 1, 10)
        await asyncio.sleep(0.3)  # a few tokens in
        call.leave.set()
        stopped_s = await _until(lambda: engine.running == 0, 5)
        await asyncio.wait_for(call.task, 5)
        return stopped_s, engine.running

    with TestClient(app) as client, _no_garbage_collection():  # the stop must not wait on a collection
        asgi.wait_ready(client)
        stopped_s, running = client.portal.call(scenario)
        text = client.get("/metrics").text
    assert running == 0 and stopped_s < 2.0  # running to the end takes over 4 s (200 steps of 20 ms)
    generated = float(text.split(f'slimserve_completion_tokens_total{{model="{MODEL}"}} ')[1].split()[0])
    assert generated < 100  # of 200: at 20 ms a step it ran about 0.3 s


# ---- shutdown -----------------------------------------------------------------------------------------


def test_shutdown_lets_short_requests_finish_then_ends_long_streams_with_an_error_chunk(
    tiny_variant_dir: Path,
) -> None:
    engine = TransformersEngine(_slow_loader(tiny_variant_dir, 0.02), MODEL, ServerMetrics())
    app: FastAPI = create_app([engine], engine.metrics)

    async def scenario() -> tuple[asgi.Call, asgi.Call, asgi.Call, asgi.Call, float]:
        long = asgi.start(app, "/v1/completions", _body(stream=True))
        blocking = asgi.start(app, "/v1/completions", _body())
        short = asgi.start(app, "/v1/completions", _body(stream=True, max_tokens=5))
        await _until(lambda: engine.running == 3, 10)
        began = time.perf_counter()
        app.state.drain.begin(1.0)
        refused = asgi.start(app, "/v1/completions", _body(max_tokens=2))
        await asyncio.wait_for(asyncio.gather(long.task, blocking.task, short.task, refused.task), 5)
        return long, blocking, short, refused, time.perf_counter() - began

    with TestClient(app) as client:
        asgi.wait_ready(client)
        long, blocking, short, refused, took_s = client.portal.call(scenario)
    assert 1.0 <= took_s < 2.0
    assert long.frames()[-1] == "data: [DONE]"
    error = json.loads(long.frames()[-2][6:])["error"]
    assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]
    assert blocking.status == 503 and blocking.json()["error"]["code"] == "server_shutting_down"
    finished = [json.loads(f[6:]) for f in short.frames()[:-1]]
    assert short.frames()[-1] == "data: [DONE]" and finished[-1]["choices"][0]["finish_reason"] == "length"
    assert refused.status == 503  # not accepting once the drain began


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
        asgi.wait_ready(client)
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


# ---- a variant that failed to load --------------------------------------------------------------------


def test_a_failed_variant_is_reported_refused_with_its_reason_and_can_be_loaded_again(tiny_variant_dir: Path) -> None:
    attempts: list[int] = []

    def flaky() -> LoadedVariant:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("weights missing")
        return load_variant(tiny_variant_dir, dtype="fp32")

    good = TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())
    bad = TransformersEngine(flaky, "tiny-broken", good.metrics)
    with TestClient(create_app([good, bad], good.metrics)) as client:
        asgi.wait_ready(client)
        health = client.get("/health").json()
        assert health["status"] == "degraded" and "weights missing" in health["errors"]["tiny-broken"]
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert cards["tiny-broken"]["slimserve"]["state"] == "failed"
        assert "weights missing" in cards["tiny-broken"]["slimserve"]["error"]
        refused = client.post("/v1/completions", json=_body(model="tiny-broken", max_tokens=2))
        assert refused.status_code == 503 and "weights missing" in refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "model_load_failed" and int(refused.headers["retry-after"]) > 1
        loaded = client.post("/v1/slimserve/variants/tiny-broken/load")
        assert loaded.status_code == 200 and loaded.json()["slimserve"]["state"] == "ready"
        assert client.post("/v1/completions", json=_body(model="tiny-broken", max_tokens=2)).status_code == 200
        assert client.get("/health").json() == {"status": "ok", "models": {MODEL: "ready", "tiny-broken": "ready"}}
        assert client.post("/v1/slimserve/variants/nope/load").status_code == 404
