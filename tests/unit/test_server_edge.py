"""The server's edge as a hostile client probes it: keys, text, types, fields it cannot honour, metric labels,
and the OpenAPI document's promises."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from slimserve.models import load_variant
from slimserve.server import middleware
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from tests.asgi import wait_ready

MODEL = "tiny-llama"
KEY = "sk-edge"


@pytest.fixture(scope="module")
def engine(tiny_variant_dir: Path) -> TransformersEngine:
    return TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())


@pytest.fixture(scope="module")
def client(engine: TransformersEngine) -> Iterator[TestClient]:
    with TestClient(create_app([engine], engine.metrics, api_key=KEY), raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        wait_ready(c)
        yield c


def _chat(client: TestClient, **fields: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2} | fields
    return client.post("/v1/chat/completions", json=body)


def _error(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"], error  # no error leaves with code null
    return error


# ---- text -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\ud800b"}]', "messages.0.content"),
        (
            "/v1/chat/completions",
            '"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
            "messages.0.content.0.text",
        ),
        ("/v1/completions", '"prompt": "a\\ud800b"', "prompt"),
        ("/v1/completions", '"prompt": "ok", "stop": ["\\ud800"]', "stop.0"),
        ("/v1/completions", '"prompt": "ok", "user": "\\ud800"', "user"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(client: TestClient, path: str, raw: str, param: str) -> None:
    """It reached the tokenizer, whose TypeError was a 500 (and a dropped keep-alive connection)."""
    body = "{" + f'"model": "{MODEL}", "max_tokens": 2, {raw}' + "}"
    error = _error(client.post(path, content=body.encode(), headers={"content-type": "application/json"}))
    assert error["param"] == param and error["code"] == "invalid_unicode"


def test_a_surrogate_in_an_echoed_name_still_gives_a_well_formed_error(client: TestClient) -> None:
    body = b'{"model": "\\ud800", "prompt": "x"}'
    error = _error(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}))
    assert error["param"] == "model"


# ---- types and fields ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"n": 1.0}, "n"),
        ({"temperature": "0.5"}, "temperature"),
        ({"logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ],
)
def test_types_are_strict_where_openai_refuses_the_value(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    """`"stream": "yes"` started a stream and `"max_tokens": true` meant 1."""
    error = _error(_chat(client, **fields))
    assert error["param"] == param and error["code"] == "invalid_type"


def test_numbers_openai_accepts_are_still_accepted(client: TestClient) -> None:
    assert _chat(client, temperature=1, top_p=1, frequency_penalty=0, logit_bias={"5": 1}).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
    ],
)
def test_every_400_names_its_field_and_code(client: TestClient, fields: dict[str, Any], param: str) -> None:
    assert _error(_chat(client, **fields))["param"] == param


@pytest.mark.parametrize(
    ("prompt", "param"), [([999999], "prompt"), ([[]], "prompt"), ("", "prompt"), ([""], "prompt")]
)
def test_prompt_errors_name_the_prompt(client: TestClient, prompt: Any, param: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    assert _error(client.post("/v1/completions", json=body))["param"] == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"best_of": 2}, "best_of"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
        ({"min_tokens": 3}, "min_tokens"),
    ],
)
def test_fields_that_would_change_the_output_are_refused(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    """They were ignored: a client asking for the deprecated functions got plain text and a 200."""
    error = _error(_chat(client, **fields))
    assert error["code"] == "unsupported" and error["param"] == param


def test_fields_that_leave_the_output_alone_are_accepted(client: TestClient) -> None:
    fine = {"user": "u1", "metadata": {"k": "v"}, "store": False, "response_format": {"type": "text"}, "tools": None}
    assert _chat(client, tool_choice="none", parallel_tool_calls=False, **fine).status_code == 200


# ---- keys -----------------------------------------------------------------------------------------------


def test_the_key_guards_everything_but_health_and_is_checked_before_the_body(client: TestClient) -> None:
    anonymous = TestClient(client.app)
    assert anonymous.get("/health").status_code == 200
    for path in ("/metrics", "/openapi.json", "/docs", "/v1/models"):
        assert _error(anonymous.get(path), 401)["type"] == "authentication_error", path
    bad_json = anonymous.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert _error(bad_json, 401)["code"] == "invalid_api_key"  # not a 400 that judged the body first
    assert client.get("/metrics").status_code == 200


def test_the_key_is_compared_in_constant_time(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert compared == [(b"wrong", KEY.encode())]


def test_public_metrics_opens_only_metrics(engine: TransformersEngine) -> None:
    app = create_app([engine], ServerMetrics(), api_key=KEY, public_metrics=True)
    anonymous = TestClient(app)
    assert anonymous.get("/metrics").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 401


# ---- metric labels ------------------------------------------------------------------------------------


def test_metric_labels_come_only_from_served_names(client: TestClient) -> None:
    """5,000 made-up model names grew /metrics to 1.46 MB; NUL bytes went into label values."""
    before = len(client.get("/metrics").text)
    for i in range(60):
        _chat(client, model=f"made-up-{i}\x00")
        client.post(f"/v1/made-up-path-{i}", json={})
    text = client.get("/metrics").text
    assert "made-up" not in text and "\\x00" not in text and "\x00" not in text
    assert 'model="unknown"' in text and 'endpoint="unmatched"' in text
    assert len(text) - before < 2000  # a few new series, not 120


# ---- the OpenAPI document -----------------------------------------------------------------------------


def test_openapi_states_the_real_responses(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    text = json.dumps(document)
    assert '"422"' not in text and "HTTPValidationError" not in text
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = document["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "429", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
        assert "Retry-After" in responses["429"]["headers"]
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    prompt = document["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert {"type": "string", "minLength": 1} in prompt["anyOf"]  # "" was allowed here, then refused
