"""Structured outputs and tool calls through the official `openai` client, on SmolLM2-135M-Instruct and its
int8 variant: JSON valid against the schema on every prompt, whatever the model would have written. The
`check_*` functions run against the vLLM backend too (tests/vllm/test_structured_vllm.py)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import RunningServer

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
VARIANTS = [MODEL, f"{MODEL}-int8-weight"]


class City(BaseModel):
    """Bounded (lengths, a range), so a greedy small model that repeats itself still closes the object well
    within max_tokens: the grammar guarantees validity, the bounds guarantee an end."""

    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int = Field(ge=0, le=100_000_000)


class WeatherArgs(BaseModel):
    city: str = Field(max_length=24)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": WeatherArgs.model_json_schema() | {"additionalProperties": False},
    },
}
CITIES = [
    "Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Toronto", "Madrid", "Seoul", "Sydney",
    "Berlin", "Mumbai", "Quito", "Dublin", "Hanoi", "Rome", "Lagos", "Vienna", "Denver", "Lisbon",
]  # fmt: skip


def _ask(city: str) -> list[Any]:
    ask = f"Give the name, country and population of {city} as a JSON object."
    return [{"role": "user", "content": ask}]


def check_parse(server: RunningServer, model: str) -> None:
    completion = server.client().chat.completions.parse(
        model=model, messages=_ask("Paris"), response_format=City, temperature=0, max_tokens=60
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City), completion.choices[0].message.content


def check_json_object(server: RunningServer, model: str) -> None:
    """json_object bounds no key or value: a small model may go on until `max_tokens` (greedy SmolLM2 does on
    vLLM's kernels). A finished answer parses as an object; a cut one is still an object so far."""
    response = server.client().chat.completions.create(
        model=model,
        messages=_ask("Tokyo"),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    choice = response.choices[0]
    text = choice.message.content or ""
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert choice.finish_reason == "length"
        assert text.startswith("{") and not _closes_early(text), text


def _closes_early(text: str) -> bool:
    """True if a JSON value ends before the text does (so the text is not one object cut short)."""
    try:
        json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return False
    return True


def check_every_prompt(server: RunningServer, variant: str) -> None:
    """20 prompts, sampled at the model's own temperature and sent 8 at a time: 100% valid. Eight share each
    step, so on two busy cores a request can outlast the client's usual 120 s."""
    client = server.client().with_options(timeout=600)

    def one(city: str) -> str | None:
        completion = client.chat.completions.parse(
            model=variant, messages=_ask(city), response_format=City, max_tokens=60, seed=len(city)
        )
        return completion.choices[0].message.content if completion.choices[0].message.parsed else None

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, CITIES))
    assert all(outputs), outputs
    for text in outputs:
        City.model_validate_json(text or "")


def check_named_tool_call(server: RunningServer, model: str) -> None:
    """Its arguments validate, and the streamed deltas reassemble to the same call (greedy both times)."""
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=80
    )
    assert response.choices[0].finish_reason == "tool_calls"
    (call,) = response.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"  # type: ignore[union-attr]
    WeatherArgs.model_validate_json(call.function.arguments)  # type: ignore[union-attr]

    name, arguments, call_id, finish = None, "", None, None
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], tool_choice=choice, temperature=0, max_tokens=80, stream=True
    )
    for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            call_id = delta.id or call_id
            name = (delta.function and delta.function.name) or name
            arguments += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", call.function.arguments, "tool_calls")  # type: ignore[union-attr]
    assert call_id and call_id.startswith("call_")


def check_required_tool_call(server: RunningServer, model: str) -> None:
    response = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Weather in Lima, in celsius?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    (call,) = response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    WeatherArgs.model_validate_json(call.function.arguments)  # type: ignore[union-attr]


def check_regex_choice_and_grammar(server: RunningServer, model: str) -> None:
    """vLLM's other constraints, as its OpenAI server takes them (`extra_body`), on chat and completions."""
    client = server.client()
    ask = [{"role": "user", "content": "Is Paris in France? Then give a date."}]
    date = r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"
    for extra in ({"guided_regex": date}, {"structured_outputs": {"regex": date}}):
        chat = client.chat.completions.create(model=model, messages=ask, max_tokens=20, temperature=0, extra_body=extra)
        assert re.fullmatch(date, chat.choices[0].message.content or ""), chat.choices[0].message.content
    choices = ["yes", "no"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        chat = client.chat.completions.create(model=model, messages=ask, max_tokens=5, temperature=0, extra_body=extra)
        assert chat.choices[0].message.content in choices
    grammar = 'root ::= ("yes" | "no") ", " [0-9] [0-9]'
    completion = client.completions.create(
        model=model, prompt="Is Paris in France?", max_tokens=10, temperature=0, extra_body={"guided_grammar": grammar}
    )
    assert re.fullmatch(r"(yes|no), [0-9]{2}", completion.choices[0].text), completion.choices[0].text


def test_parse_returns_the_pydantic_object(server: RunningServer) -> None:
    check_parse(server, MODEL)


def test_json_object_is_json(server: RunningServer) -> None:
    check_json_object(server, MODEL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_prompt_is_valid_against_the_schema(server: RunningServer, variant: str) -> None:
    check_every_prompt(server, variant)


def test_named_tool_call_arguments_validate_and_stream_to_the_same_call(server: RunningServer) -> None:
    check_named_tool_call(server, MODEL)


def test_required_tool_call(server: RunningServer) -> None:
    check_required_tool_call(server, MODEL)


def test_regex_choice_and_grammar(server: RunningServer) -> None:
    check_regex_choice_and_grammar(server, MODEL)
