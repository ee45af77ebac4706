"""The OpenAI surface on a tiny real model, in-process through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from slimserve.models import LoadedVariant, load_variant
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from tests.asgi import wait_ready

MODEL = "tiny-llama"
KEY = "sk-test"


def _client(engines: list[TransformersEngine], api_key: str | None = KEY) -> TestClient:
    return TestClient(create_app(engines, engines[0].metrics, api_key=api_key), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_variant_dir: Path) -> Iterator[TestClient]:
    engine = TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())
    with _client([engine]) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        wait_ready(c)
        yield c


def _chat(client: TestClient, **fields: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8} | fields
    return client.post("/v1/chat/completions", json=body)


def _sse(response: Any) -> list[Any]:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_chat_completion_shape_and_exact_usage(client: TestClient, tiny_loaded: LoadedVariant) -> None:
    response = _chat(client, temperature=0, max_tokens=6, ignore_eos=True)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    prompt = tiny_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=False
    )
    expected_prompt_tokens = len(tiny_loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": expected_prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": expected_prompt_tokens + 6,
    }


def test_seed_repeats_and_n_gives_indexed_choices(client: TestClient) -> None:
    first = _chat(client, temperature=1.0, seed=11, n=3, max_tokens=10, logprobs=True).json()
    again = _chat(client, temperature=1.0, seed=11, n=3, max_tokens=10, logprobs=True).json()
    other = _chat(client, temperature=1.0, seed=12, n=3, max_tokens=10, logprobs=True).json()
    texts = [c["message"]["content"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert texts != [c["message"]["content"] for c in other["choices"]]
    assert len(set(texts)) > 1  # choices draw differently
    generated = sum(len(c["logprobs"]["content"]) for c in first["choices"])
    assert first["usage"]["completion_tokens"] == generated


def test_stream_frames_chunks_usage_and_done(client: TestClient) -> None:
    response = _chat(
        client, stream=True, stream_options={"include_usage": True}, temperature=0, max_tokens=7, ignore_eos=True
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(response)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    blocking = _chat(client, temperature=0, max_tokens=7, ignore_eos=True).json()
    assert streamed == blocking["choices"][0]["message"]["content"]


def test_stop_sequence_cuts_text_in_both_modes(client: TestClient) -> None:
    full = _chat(client, temperature=0, max_tokens=30, ignore_eos=True).json()["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[3:5]
    cut = _chat(client, temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["message"]["content"] == full[: full.index(stop)]
    chunks = _sse(_chat(client, temperature=0, max_tokens=30, ignore_eos=True, stop=stop, stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == full[: full.index(stop)]


def test_logprobs_in_chat_and_stream(client: TestClient) -> None:
    body = _chat(client, temperature=0, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    assert all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)
    # greedy: the chosen token is the most likely one
    assert all(c["top_logprobs"][0]["logprob"] == pytest.approx(c["logprob"]) for c in content)
    chunks = _sse(_chat(client, temperature=0, max_tokens=4, ignore_eos=True, logprobs=True, stream=True))
    streamed = [
        lp
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for lp in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(streamed) == 4


def test_completions_endpoint_with_echo_and_logprobs(client: TestClient) -> None:
    body = {
        "model": MODEL,
        "prompt": ["The capital", "Count"],
        "max_tokens": 3,
        "temperature": 0,
        "echo": True,
        "logprobs": 2,
        "ignore_eos": True,
    }
    result = client.post("/v1/completions", json=body).json()
    assert result["object"] == "text_completion"
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert result["choices"][0]["text"].startswith("The capital")
    assert len(result["choices"][1]["logprobs"]["tokens"]) == 3
    assert result["usage"]["completion_tokens"] == 6


def test_models_endpoints(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 256
    assert client.get(f"/v1/models/{MODEL}").json()["slimserve"]["method"] == "none"
    assert client.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"top_p": 0}, "top_p"),
        ({"top_logprobs": 2}, None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"5": 300}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, None),
    ],
)
def test_bad_values_are_400_with_openai_shape(client: TestClient, fields: dict[str, Any], param: str | None) -> None:
    response = _chat(client, **fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param


def test_context_window_error_gives_both_numbers(client: TestClient) -> None:
    response = _chat(client, max_tokens=500)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "256" in message and "500" in message


def test_unknown_model_is_404_and_invalid_json_is_400(client: TestClient) -> None:
    assert _chat(client, model="gpt-4").status_code == 404
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_unknown_fields_are_accepted(client: TestClient) -> None:
    assert _chat(client, metadata={"x": 1}, store=False, some_future_field=3).status_code == 200


def test_api_key_required_but_health_open(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    assert anonymous.get("/health").status_code == 200
    denied = anonymous.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_metrics_count_requests_and_tokens(client: TestClient) -> None:
    _chat(client, max_tokens=2, ignore_eos=True)
    text = client.get("/metrics").text
    for name in (
        "slimserve_requests_total",
        "slimserve_completion_tokens_total",
        "slimserve_time_to_first_token_seconds_bucket",
        "slimserve_time_per_output_token_seconds_bucket",
        "slimserve_queue_depth",
    ):
        assert name in text
    assert f'slimserve_requests_total{{endpoint="/v1/chat/completions",model="{MODEL}",status="200"}}' in text


def test_health_is_503_while_loading(tiny_variant_dir: Path) -> None:
    release = threading.Event()

    def slow_load() -> LoadedVariant:
        release.wait(30)
        return load_variant(tiny_variant_dir, dtype="fp32")

    engine = TransformersEngine(slow_load, MODEL, ServerMetrics())
    with _client([engine], api_key=None) as c:
        assert c.get("/health").status_code == 503
        assert _chat(c).status_code == 503
        release.set()
        wait_ready(c)
        assert _chat(c).status_code == 200


def test_error_after_stream_started_is_a_data_chunk_then_done(tiny_variant_dir: Path) -> None:
    def load_then_break_decoding() -> LoadedVariant:
        loaded = load_variant(tiny_variant_dir, dtype="fp32")
        forward, calls = loaded.model.forward, [0]

        def failing_forward(*args: Any, **kwargs: Any) -> Any:
            if not armed.is_set():  # the load-time warm-up's forwards
                return forward(*args, **kwargs)
            calls[0] += 1
            if calls[0] > 2:  # the prefill and one decode step succeed, then the model breaks
                raise RuntimeError("simulated kernel failure")
            return forward(*args, **kwargs)

        loaded.model.forward = failing_forward
        return loaded

    armed = threading.Event()
    engine = TransformersEngine(load_then_break_decoding, MODEL, ServerMetrics())
    with _client([engine], api_key=None) as c:
        wait_ready(c)
        armed.set()
        response = _chat(c, stream=True, max_tokens=20, ignore_eos=True)
    assert response.status_code == 200
    frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    error = json.loads(frames[-2][6:])["error"]
    assert "simulated kernel failure" in error["message"] and error["type"] == "server_error"
    assert any('"delta"' in f for f in frames[:-2])  # content had started before the failure


def test_omitted_sampling_fields_take_the_models_generation_config(tmp_path: Path) -> None:
    from transformers import GenerationConfig

    from tests.tiny import make_tiny_variant

    variant = make_tiny_variant(tmp_path / "tiny-topk1")
    GenerationConfig(do_sample=True, top_k=1, eos_token_id=2).save_pretrained(variant)
    engine = TransformersEngine(lambda: load_variant(variant, dtype="fp32"), MODEL, ServerMetrics())
    with _client([engine], api_key=None) as c:
        wait_ready(c)
        assert engine.sampling_defaults == {"top_k": 1}
        hot = [_chat(c, temperature=1.5, max_tokens=12, ignore_eos=True).json() for _ in range(3)]
        texts = {r["choices"][0]["message"]["content"] for r in hot}
        assert len(texts) == 1  # the model's top_k=1 makes even a hot request greedy
        free = [_chat(c, temperature=1.5, top_k=0, max_tokens=12, ignore_eos=True).json() for _ in range(3)]
        assert len({r["choices"][0]["message"]["content"] for r in free}) > 1  # the request's own value wins


def test_omitted_max_tokens_is_capped_by_the_server_default(tiny_variant_dir: Path) -> None:
    capped = TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())
    app = create_app([capped], capped.metrics, default_max_tokens=5)
    with TestClient(app) as c:
        wait_ready(c)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
        result = c.post("/v1/chat/completions", json=body).json()
        assert result["usage"]["completion_tokens"] == 5 and result["choices"][0]["finish_reason"] == "length"
        explicit = c.post("/v1/chat/completions", json=body | {"max_tokens": 9}).json()
        assert explicit["usage"]["completion_tokens"] == 9


@pytest.mark.parametrize("stream", [True, False])
def test_a_routed_request_calibrates_the_router_streamed_or_not(tiny_variant_dir: Path, stream: bool) -> None:
    """Most clients stream: a streamed answer that ended on its own teaches the router as a collected one does."""
    engine = TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())
    with _client([engine]) as routed:
        routed.headers["Authorization"] = f"Bearer {KEY}"
        wait_ready(routed)
        assert routed.get("/v1/slimserve/router").json()["calibration"] == 1.0
        body = {"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream}
        response = routed.post("/v1/chat/completions", json=body, headers={"X-Latency-Budget-Ms": "600000"})
        assert response.status_code == 200 and response.headers["X-Slimserve-Budget"] == "predicted-met"
        assert routed.get("/v1/slimserve/router").json()["calibration"] != 1.0
