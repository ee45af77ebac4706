"""The official `openai` client, unchanged, against `slimserve serve` on SmolLM2-135M-Instruct."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, RunningServer

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_answers_paris(server: RunningServer) -> None:
    response = server.client().chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None and response.usage.prompt_tokens > 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_stream_with_usage_matches_blocking_answer(server: RunningServer) -> None:
    client = server.client()
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


def test_stop_sequence(server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Count from 1 to 10, one number per line."}]
    response = server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stop=["5"], max_tokens=60
    )
    content = response.choices[0].message.content or ""
    assert response.choices[0].finish_reason == "stop"
    assert "5" not in content and "4" in content


def test_n_and_seed(server: RunningServer) -> None:
    client = server.client()
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        temperature=1.0,
        max_tokens=24,
        n=2,
        seed=1234,
    )
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content


def test_legacy_completions(server: RunningServer) -> None:
    response = server.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=1
    )
    assert "Paris" in response.choices[0].text
    assert response.choices[0].logprobs is not None
    assert len(response.choices[0].logprobs.tokens or []) == response.usage.completion_tokens  # type: ignore[union-attr]


def test_errors_have_openai_shape(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=100_000)
    assert re.search(r"8192.*100000", too_long.value.message)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_disconnect_stops_generation(server: RunningServer) -> None:
    def generated() -> float:
        text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
        match = re.search(rf'slimserve_completion_tokens_total{{model="{MODEL}"}} (\S+)', text)
        return float(match.group(1)) if match else 0.0

    before = generated()
    stream = server.client().chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while generated() == before and time.monotonic() < deadline:
        time.sleep(0.2)  # the engine accounts a sequence's tokens when it ends
    assert 0 < generated() - before < 500


def test_quantized_variant_is_served_and_listed(server: RunningServer) -> None:
    client = server.client()
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, f"{MODEL}-int8-weight", "auto"}  # auto: the router picks in the family
    assert models[f"{MODEL}-int8-weight"].model_extra["slimserve"]["bits"] == 8  # type: ignore[index]
    response = client.chat.completions.create(model=f"{MODEL}-int8-weight", messages=FRANCE, temperature=0)
    assert "Paris" in (response.choices[0].message.content or "")
    assert response.model == f"{MODEL}-int8-weight"


def test_requests_without_sampling_fields_are_greedy_on_the_default_model(server: RunningServer) -> None:
    """The converted teacher's generation_config says do_sample=false: a bare request answers like greedy
    (sampled at temperature 1 this 135M model answers Paris only about half the time)."""
    client = server.client()
    bare = [client.chat.completions.create(model=MODEL, messages=FRANCE, seed=s) for s in range(3)]
    greedy = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert {r.choices[0].message.content for r in bare} == {greedy.choices[0].message.content}
    assert "Paris" in (greedy.choices[0].message.content or "")
    hot = {
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=1.0, seed=s, max_tokens=12)
        .choices[0]
        .message.content
        for s in range(4)
    }
    assert len(hot) > 1  # a request's own temperature still samples


def test_budgets_route_within_the_family_through_the_unchanged_client(server: RunningServer) -> None:
    client = server.client()
    # an impossible latency budget: the fastest variant serves, and the response says the budget was missed
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=FRANCE, temperature=0, max_tokens=8, extra_headers={"X-Latency-Budget-Ms": "1"}
    )
    completion = raw.parse()
    assert raw.headers["x-slimserve-budget"] == "predicted-missed"
    assert completion.model == raw.headers["x-slimserve-variant"] == f"{MODEL}-int8-weight"
    # the same budget in the body: again a predicted miss served by the fastest fallback. Which variant
    # that is depends on the machine (on a CPU without native bf16 the fp32 teacher can outrun the bf16
    # int8 kernels) and is ranked by the manifests' figures, not the live predictions listed as candidates
    # (unit tests pin the rule down: test_router.py)
    in_body = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=8, extra_body={"slimserve": {"latency_budget_ms": 1}}
    )
    state = httpx.get(
        f"{server.base_url}/v1/slimserve/router", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    ).json()
    last = state["decisions"][-1]
    assert last["budget_met"] is False and last["budget"] == {"latency_ms": 1}
    assert in_body.model == last["variant"] and set(last["candidates"]) == {MODEL, f"{MODEL}-int8-weight"}
    assert last["reason"].startswith("no variant predicted within the latency budget: fastest")
    # no budget at all keeps the teacher (the best quality)
    assert client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8).model == MODEL
    with pytest.raises(openai.BadRequestError, match="tier"):
        client.chat.completions.create(
            model="auto", messages=FRANCE, max_tokens=8, extra_headers={"X-Min-Quality": "superb"}
        )
