"""Structured outputs and tool calls on the transformers engine, with a tiny random model: its unconstrained
output is noise, so JSON that parses and validates can only come from the grammar."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from slimserve.models import load_variant
from slimserve.models.loader import LoadedVariant
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.sampling import Sampler, SamplingParams
from slimserve.server.structured import MASK_MS_PRIOR, Constraint, GrammarCache, SchemaError, TokenMask, check
from tests.asgi import wait_ready

MODEL = "tiny-llama"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def engine(tiny_variant_dir: Path) -> TransformersEngine:
    return TransformersEngine(lambda: load_variant(tiny_variant_dir, dtype="fp32"), MODEL, ServerMetrics())


@pytest.fixture(scope="module")
def client(engine: TransformersEngine) -> Iterator[TestClient]:
    with TestClient(create_app([engine], engine.metrics), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def _chat(client: TestClient, **fields: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60, "seed": 1} | fields
    return client.post("/v1/chat/completions", json=body)


def _person_ok(value: Any) -> bool:
    """The schema's keys, in its order, with an integer age."""
    return isinstance(value, dict) and list(value) == ["name", "age"] and isinstance(value["age"], int)


def _generate(tiny: LoadedVariant, mask: TokenMask | None, seed: int, steps: int = 40) -> str:
    """Sample from the tiny model's logits (temperature 1) under `mask`, as the engine's sampler does."""
    sampler = Sampler(SamplingParams(max_tokens=steps, seed=seed), tiny.model.config.vocab_size, mask)
    ids = tiny.tokenizer("Hi", return_tensors="pt")["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = tiny.model(input_ids=ids).logits[0, -1].float()
            token, _ = sampler.sample(logits)
            if token in tiny.eos_token_ids:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return str(tiny.tokenizer.decode(out))


def test_constrained_output_is_valid_json_where_unconstrained_is_not(tiny_loaded: LoadedVariant) -> None:
    vocab = tiny_loaded.model.config.vocab_size
    grammars = GrammarCache(tiny_loaded.tokenizer, vocab, tiny_loaded.eos_token_ids)
    constraint = grammars.compile(Constraint.json_schema(PERSON, "response_format"))
    free = [_generate(tiny_loaded, None, seed) for seed in range(3)]
    bound = [_generate(tiny_loaded, TokenMask(constraint.grammar), seed, steps=80) for seed in range(3)]
    for text in free:
        with pytest.raises(ValueError):
            json.loads(text)
    for text in bound:
        assert _person_ok(json.loads(text)), text


def test_a_schema_compiles_once_per_engine(tiny_loaded: LoadedVariant) -> None:
    grammars = GrammarCache(tiny_loaded.tokenizer, tiny_loaded.model.config.vocab_size, tiny_loaded.eos_token_ids)
    grammars.compile(Constraint.json_schema(PERSON, "response_format"))
    cached = grammars.cached_bytes
    grammars.compile(Constraint.json_schema(json.loads(json.dumps(PERSON)), "guided_json"))
    assert cached > 0 and grammars.cached_bytes == cached  # the same schema from another request: a cache hit
    grammars.compile(Constraint.json_object("response_format"))
    assert grammars.cached_bytes > cached


def test_a_schema_the_library_cannot_compile_names_its_field() -> None:
    with pytest.raises(SchemaError) as caught:
        check(Constraint.json_schema({"type": "strin"}, "response_format.json_schema.schema"))
    assert caught.value.param == "response_format.json_schema.schema" and "strin" in str(caught.value)


def test_chat_json_schema_per_sequence_in_one_batch(client: TestClient) -> None:
    """n=3 constrained choices (one matcher each) run in the batch beside free requests: each choice is valid,
    and the free ones stay free (not JSON)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    with ThreadPoolExecutor(3) as pool:
        free = [pool.submit(_chat, client, temperature=1.0, max_tokens=40, seed=s) for s in (7, 8)]
        bound = _chat(client, response_format=fmt, n=3, temperature=1.0, max_tokens=80)
        texts = [f.result().json()["choices"][0]["message"]["content"] for f in free]
    assert bound.status_code == 200, bound.text
    for choice in bound.json()["choices"]:
        assert _person_ok(json.loads(choice["message"]["content"])), choice
        assert choice["finish_reason"] == "stop"
    for text in texts:
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_on_both_endpoints(client: TestClient) -> None:
    chat = _chat(client, response_format={"type": "json_object"}, max_tokens=80).json()
    assert isinstance(json.loads(chat["choices"][0]["message"]["content"]), dict)
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 80, "seed": 2, "response_format": {"type": "json_object"}}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert isinstance(json.loads(text), dict), text


def test_vllm_forms_name_the_same_constraint(client: TestClient) -> None:
    for fields in ({"guided_json": PERSON}, {"structured_outputs": {"json": json.dumps(PERSON)}}):
        response = _chat(client, max_tokens=80, **fields)
        assert response.status_code == 200, response.text
        assert _person_ok(json.loads(response.json()["choices"][0]["message"]["content"]))


def test_streamed_json_schema_reassembles_to_valid_json(client: TestClient) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    with client.stream("POST", "/v1/chat/completions", json=_chat_body(response_format=fmt, stream=True)) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert _person_ok(json.loads(text)), text


def _chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 80, "seed": 3} | fields


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format.json_schema.schema",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        (
            {
                "tools": [WEATHER | {"function": {"name": "f", "parameters": {"type": "strin"}}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            "tools.0.function.parameters",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}, "guided_json": PERSON}, "guided_json"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(client: TestClient, fields: dict[str, Any], param: str) -> None:
    response = _chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_named_tool_call_arguments_follow_the_schema(client: TestClient) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = _chat(client, tools=[WEATHER, TIME], tool_choice=named).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}


def test_required_tool_calls_name_the_tools(client: TestClient) -> None:
    # one call: a random model left free to add calls adds them until max_tokens
    body = _chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    for call in choice["message"]["tool_calls"]:
        assert call["function"]["name"] in {"get_weather", "get_time"}
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_reassemble_to_the_call(client: TestClient, choice: Any) -> None:
    body = _chat_body(tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False, stream=True, max_tokens=120)
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls") or []:
            call = calls.setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = delta.get("id") or call["id"]
            call["name"] = delta["function"].get("name") or call["name"]
            call["arguments"] += delta["function"].get("arguments") or ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert calls and all(c["id"] and c["name"] == "get_weather" for c in calls.values())
    assert all(set(json.loads(c["arguments"])) == {"city"} for c in calls.values())


def test_tools_reach_a_template_that_takes_them_and_history_renders(client: TestClient) -> None:
    """`auto` answers in text; an assistant turn with tool_calls and a tool turn render through the template."""
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = _chat(client, messages=history, tools=[WEATHER], tool_choice="auto", max_tokens=4)
    assert response.status_code == 200, response.text
    assert "tool_calls" not in response.json()["choices"][0]["message"]


def test_the_vllm_backend_gets_the_same_schema() -> None:
    assert Constraint.json_object("response_format").vllm_kwargs() == {"json": {"type": "object"}}
    assert Constraint.json_schema(PERSON, "guided_json").vllm_kwargs() == {"json": PERSON}


def test_the_engine_times_its_masks_for_the_router(client: TestClient, engine: TransformersEngine) -> None:
    _chat(client, response_format={"type": "json_object"}, max_tokens=20)
    assert engine.mask_ms_per_token != MASK_MS_PRIOR and engine.mask_ms_per_token > 0


def test_logprobs_of_a_constrained_choice_are_the_models_own(client: TestClient) -> None:
    """The mask works on a copy then: the top alternatives include tokens the grammar forbade, all finite."""
    body = _chat(client, response_format={"type": "json_object"}, logprobs=True, top_logprobs=5, max_tokens=6)
    assert body.status_code == 200, body.text
    content = body.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 5 for t in content)
    assert all(alt["logprob"] > -1e9 for t in content for alt in t["top_logprobs"])
    assert content[0]["token"] == "{"


@pytest.fixture(scope="module")
def openai_client(client: TestClient) -> Any:
    """The official client, talking to the app through the test client's transport."""
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


PLATE = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["yes", "no", 'maybe "so"\n']


@pytest.mark.parametrize(
    "extra", [{"guided_regex": PLATE}, {"structured_outputs": {"regex": PLATE}}], ids=["guided", "structured_outputs"]
)
def test_the_output_matches_the_regex_on_both_endpoints(openai_client: Any, extra: dict[str, Any]) -> None:
    chat = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=20, seed=4, n=2, extra_body=extra
    )
    completion = openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=5, extra_body=extra)
    texts = [c.message.content for c in chat.choices] + [completion.choices[0].text]
    assert all(re.fullmatch(PLATE, text) for text in texts), texts


@pytest.mark.parametrize(
    "extra",
    [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}],
    ids=["guided", "structured_outputs"],
)
def test_the_output_is_one_of_the_choices(openai_client: Any, extra: dict[str, Any]) -> None:
    for seed in range(4):
        chat = openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=20, seed=seed, extra_body=extra
        )
        assert chat.choices[0].message.content in CHOICES
    completion = openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=9, extra_body=extra)
    assert completion.choices[0].text in CHOICES


def test_the_output_follows_the_ebnf_grammar(openai_client: Any) -> None:
    grammar = 'root ::= animal " " [0-9] [0-9]\nanimal ::= "cat" | "dog"'
    for extra in ({"guided_grammar": grammar}, {"structured_outputs": {"grammar": grammar}}):
        completion = openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=20, seed=3, extra_body=extra)
        assert re.fullmatch(r"(cat|dog) [0-9]{2}", completion.choices[0].text), completion.choices[0].text


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ],
)
def test_a_constraint_that_cannot_compile_is_a_400_naming_the_field(
    openai_client: Any, extra: dict[str, Any], param: str
) -> None:
    from openai import BadRequestError

    for create, fields in (
        (openai_client.chat.completions.create, {"messages": [{"role": "user", "content": "Hi"}]}),
        (openai_client.completions.create, {"prompt": "Hi"}),
    ):
        with pytest.raises(BadRequestError) as caught:
            create(model=MODEL, max_tokens=4, extra_body=extra, **fields)
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == param, error


def test_the_vllm_backend_gets_regex_choice_and_grammar() -> None:
    assert Constraint("regex", PLATE, "guided_regex").vllm_kwargs() == {"regex": PLATE}
    assert Constraint.choice(CHOICES, "guided_choice").vllm_kwargs() == {"choice": CHOICES}
    assert Constraint("grammar", "root ::= a", "guided_grammar").vllm_kwargs() == {"grammar": "root ::= a"}
