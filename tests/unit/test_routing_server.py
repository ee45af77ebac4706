"""Budget routing through the server, on real tiny models: the family name routes, variants load and are
evicted within the memory budget, a routed request carries its deadline, is shed from a full variant and is
tokenized once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from slimserve.models import VariantManifest, load_variant
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.prompts import PromptCache, tokenizer_key
from slimserve.server.sampling import SamplingParams
from slimserve.server.serving_engine import EngineBusyError, RequestHandle
from tests import asgi
from tests.tiny import make_tiny_variant


def _family(root: Path) -> list[tuple[str, Path]]:
    made = []
    for name, layers, hidden, ppl, b1 in (("tiny-teacher", 4, 128, 10.0, 20.0), ("tiny-small", 1, 64, 11.0, 200.0)):
        path = make_tiny_variant(root / name, name=name, layers=layers, hidden=hidden)
        manifest = VariantManifest.read(path)
        manifest.base_model = manifest.family = "tiny-teacher"
        manifest.metrics = {"perplexity": ppl, "decode_tok_s_b1": b1, "decode_tok_s_b8": 4 * b1, "ttft_ms_128": 20}
        manifest.write(path)
        made.append((name, path))
    return made


def _engines(root: Path, metrics: ServerMetrics) -> list[TransformersEngine]:
    return [
        TransformersEngine(lambda p=path: load_variant(p, dtype="fp32"), name, metrics, VariantManifest.read(path))
        for name, path in _family(root)
    ]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    metrics = ServerMetrics()
    engines = _engines(tmp_path_factory.mktemp("family"), metrics)
    with TestClient(create_app(engines, metrics), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        yield c


def _ask(client: TestClient, model: str, headers: dict[str, str] | None = None, **extra: object) -> object:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, **extra}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def test_the_family_name_routes_by_budget_and_exact_names_bypass_the_router(client: TestClient) -> None:
    # 50 tokens: teacher predicted ~2.5 s (20 tok/s in its manifest), small ~0.25 s (200 tok/s); the tight
    # requests come first, while the teacher's profile is still its manifest's (traffic then corrects it)
    tight = _ask(client, "auto", {"X-Latency-Budget-Ms": "1000"})
    assert tight.json()["model"] == "tiny-small"  # type: ignore[attr-defined]
    assert tight.headers["x-slimserve-variant"] == "tiny-small"  # type: ignore[attr-defined]
    in_body = _ask(client, "tiny-teacher", slimserve={"latency_budget_ms": 1000})
    assert in_body.json()["model"] == "tiny-small"  # type: ignore[attr-defined]
    loose = _ask(client, "tiny-teacher", {"X-Latency-Budget-Ms": "60000"})
    assert loose.status_code == 200  # type: ignore[attr-defined]
    assert loose.json()["model"] == "tiny-teacher"  # type: ignore[attr-defined]
    assert loose.headers["x-slimserve-budget"] == "predicted-met"  # type: ignore[attr-defined]
    exact = _ask(client, "tiny-small", {"X-Latency-Budget-Ms": "60000"})
    assert exact.json()["model"] == "tiny-small"  # type: ignore[attr-defined]
    assert "x-slimserve-budget" not in exact.headers  # type: ignore[attr-defined]
    bad = _ask(client, "auto", {"X-Latency-Budget-Ms": "fast"})
    assert bad.status_code == 400  # type: ignore[attr-defined]
    assert bad.json()["error"]["param"] == "x-latency-budget-ms"  # type: ignore[attr-defined]
    too_small = _ask(client, "auto", {"X-Memory-Budget-Mb": "0.001"})
    assert too_small.status_code == 400 and "smaller than every" in too_small.json()["error"]["message"]  # type: ignore[attr-defined]

    state = client.get("/v1/slimserve/router").json()
    assert {v["name"] for v in state["variants"]} == {"tiny-teacher", "tiny-small"}
    assert [d["variant"] for d in state["decisions"]] == ["tiny-small", "tiny-small", "tiny-teacher"]
    assert any(v["profile"]["observations"] > 0 for v in state["variants"])  # fed by real traffic
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["tiny-teacher"]["slimserve"]["routes"] == ["tiny-teacher", "tiny-small"]
    assert models["tiny-small"]["slimserve"]["quality_ratio"] == pytest.approx(1.1)
    assert "auto" in models
    text = client.get("/metrics").text
    assert 'slimserve_routed_requests_total{budget="met",model="tiny-small"}' in text


def test_variants_beyond_the_memory_budget_load_on_demand_and_idle_ones_are_evicted(tmp_path: Path) -> None:
    metrics = ServerMetrics()
    engines = _engines(tmp_path, metrics)
    sizes = [e.manifest.size_bytes / 1e6 + 150 for e in engines if e.manifest]
    budget = max(sizes) + 1  # room for one variant at a time
    with TestClient(create_app(engines, metrics, memory_budget_mb=budget), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/health").json()["models"] == {"tiny-teacher": "ready", "tiny-small": "unloaded"}
        assert _ask(c, "tiny-small").json()["model"] == "tiny-small"  # loaded on demand
        assert c.get("/health").json()["models"] == {"tiny-teacher": "unloaded", "tiny-small": "ready"}
        back = _ask(c, "tiny-teacher").json()
        assert back.get("model") == "tiny-teacher", back  # and back
        text = c.get("/metrics").text
        assert 'slimserve_variant_evictions_total{model="tiny-teacher"} 1.0' in text
        assert 'slimserve_variant_loads_total{model="tiny-teacher"} 2.0' in text


def test_a_variant_serving_a_request_is_never_evicted(tmp_path: Path) -> None:
    import asyncio

    from slimserve.server.errors import APIError
    from slimserve.server.pool import VariantPool

    metrics = ServerMetrics()
    engines = _engines(tmp_path, metrics)
    pool = VariantPool(
        engines, metrics, memory_budget_mb=max(e.manifest.size_bytes / 1e6 for e in engines if e.manifest) + 151
    )

    async def scenario() -> None:
        pool.start()
        teacher, small = pool.entries["tiny-teacher"], pool.entries["tiny-small"]
        await asyncio.to_thread(teacher.engine.wait_ready)
        await pool.acquire(teacher)  # reserved: a request is on its way to the teacher
        with pytest.raises(APIError, match="memory budget"):
            await pool.acquire(small)
        assert teacher.resident and not small.started
        pool.release(teacher)
        await pool.acquire(small)  # now the idle teacher can make room
        assert small.resident and not teacher.started
        pool.release(small)

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


def test_a_routed_request_carries_its_deadline_to_the_engine(tmp_path: Path) -> None:
    """The compute thread and the router see each routed sequence's deadline (arrival + latency budget), from
    the submit on: the compute thread may take its first look at the queue before the submit returns."""
    metrics = ServerMetrics()
    engines = _engines(tmp_path, metrics)
    handles: list[tuple[str, RequestHandle]] = []
    for engine in engines:
        submit_many = engine.submit_many

        def spy(  # type: ignore[no-untyped-def]
            sequences: list[tuple[list[int], SamplingParams]],
            deadline: float | None = None,
            submit_many=submit_many,
            name=engine.name,
        ) -> list[RequestHandle]:
            queued = submit_many(sequences, deadline)
            assert all(handle.deadline == deadline for handle in queued)  # set on the handles before they queue
            handles.extend((name, handle) for handle in queued)
            return queued

        engine.submit_many = spy  # type: ignore[method-assign]
    with TestClient(create_app(engines, metrics), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        before = time.perf_counter()
        assert _ask(c, "auto", {"X-Latency-Budget-Ms": "30000"}).status_code == 200  # type: ignore[attr-defined]
        after = time.perf_counter()
        assert _ask(c, "auto").status_code == 200  # type: ignore[attr-defined]
        assert _ask(c, "tiny-small", {"X-Latency-Budget-Ms": "30000"}).status_code == 200  # type: ignore[attr-defined]
    (_, budgeted), (_, unbudgeted), (_, exact) = handles
    assert budgeted.deadline is not None and before + 30 <= budgeted.deadline <= after + 30
    assert unbudgeted.deadline is None  # no budget: best effort
    assert exact.deadline is None  # an exact name bypasses the router and its budget


def test_a_request_shed_from_a_full_variant_is_predicted_and_learned_as_the_one_that_served_it(
    tmp_path: Path,
) -> None:
    """The teacher is full (it refuses every submission as busy): a loose request the router sends there falls
    through to the small variant, and the decision it leaves (header, inspection, what the calibration
    learns from) carries the small variant's prediction, not the teacher's."""
    metrics = ServerMetrics()
    engines = _engines(tmp_path, metrics)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise EngineBusyError("full")

    next(e for e in engines if e.name == "tiny-teacher").submit_many = full  # type: ignore[method-assign]
    with TestClient(create_app(engines, metrics), raise_server_exceptions=False) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        response = _ask(c, "auto", {"X-Latency-Budget-Ms": "60000"})
        assert response.status_code == 200  # type: ignore[attr-defined]
        assert response.headers["x-slimserve-variant"] == "tiny-small"  # type: ignore[attr-defined]
        # the sequence as the engine that served it names it (the turn trace's id)
        assert response.headers["x-slimserve-sequences"].startswith("tiny-small-")  # type: ignore[attr-defined]
        decision = c.get("/v1/slimserve/router").json()["decisions"][-1]
    assert "tiny-teacher was full, shed to tiny-small" in decision["reason"]
    assert decision["variant"] == "tiny-small"
    assert decision["predicted_ms"] == decision["candidates"]["tiny-small"] != decision["candidates"]["tiny-teacher"]
    assert response.headers["x-slimserve-predicted-ms"] == f"{decision['predicted_ms']:.0f}"  # type: ignore[attr-defined]
    assert response.headers["x-slimserve-route-reason"] == decision["reason"]  # type: ignore[attr-defined]


def test_a_routed_request_is_tokenized_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router counts the prompt's tokens on a resident variant; the variant it chooses has the family's
    tokenizer, so it takes those ids rather than tokenizing the prompt again."""
    metrics = ServerMetrics()
    engines = _engines(tmp_path, metrics)
    with TestClient(create_app(engines, metrics), raise_server_exceptions=False) as c:
        asgi.wait_ready(c)
        tokenizer_class = type(engines[0].tokenizer)
        texts: list[str] = []
        tokenize = tokenizer_class.__call__

        def counting(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
            texts.append(text)
            return tokenize(self, text, *args, **kwargs)

        monkeypatch.setattr(tokenizer_class, "__call__", counting)
        for model, budget in (("auto", "1000"), ("tiny-teacher", "60000"), ("tiny-small", "60000")):
            texts.clear()
            response = _ask(c, model, {"X-Latency-Budget-Ms": budget}, max_tokens=2)
            assert response.status_code == 200, response.json()  # type: ignore[attr-defined]
            assert len(texts) == 1, (model, texts)


def test_prompts_are_built_again_only_for_a_tokenizer_that_differs(tmp_path: Path) -> None:
    tokenizers = [AutoTokenizer.from_pretrained(make_tiny_variant(tmp_path / name, name=name)) for name in "ab"]
    other = AutoTokenizer.from_pretrained(tmp_path / "a")
    other.add_tokens(["<|tool|>"])
    assert tokenizer_key(tokenizers[0]) == tokenizer_key(tokenizers[1]) != tokenizer_key(other)

    def engine(tokenizer: Any, vocab: int = 400) -> Any:  # what PromptCache reads of an engine
        config = SimpleNamespace(vocab_size=vocab)
        return SimpleNamespace(tokenizer=tokenizer, variant=SimpleNamespace(model=SimpleNamespace(config=config)))

    built: list[Any] = []
    cache = PromptCache(lambda e: built.append(e) or [list(e.tokenizer("hello")["input_ids"])])
    first = cache.prompts(engine(tokenizers[0]))
    assert cache.prompts(engine(tokenizers[1])) is first and len(built) == 1
    cache.prompts(engine(other))
    cache.prompts(engine(tokenizers[1], vocab=512))  # token-id prompts are checked against the model's vocabulary
    assert len(built) == 3
