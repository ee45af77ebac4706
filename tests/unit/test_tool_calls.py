"""`tool_choice: "auto"`: calls found in the model's output by the format its chat template defines (Hermes's
`<tool_call>` tags), and free text where the template defines none."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from slimserve.models import load_variant
from slimserve.server.app import create_app
from slimserve.server.engine import TransformersEngine
from slimserve.server.metrics import ServerMetrics
from slimserve.server.tool_calls import ToolCallPlan, ToolCallStream, parse_hermes, template_call_format
from tests.asgi import wait_ready

MODEL = "tiny-hermes"
HERMES_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' }}{% for t in tools %}{{ t.function.name }} {% endfor %}"
    '{{ \'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\\n\' }}{% endif %}'
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_hermes_calls_are_found_in_text() -> None:
    text = f"Let me look.\n{CALL}\n" + CALL.replace("Paris", "Rome")
    calls = parse_hermes(text)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    plan = ToolCallPlan(forced=None, auto=True)
    assert plan.content(text) == "Let me look."
    assert parse_hermes(CALL.removesuffix("</tool_call>"))  # a call cut at its closing tag still counts
    assert not parse_hermes("<tool_call>not json</tool_call> and <tool_call>[1]</tool_call>")
    assert plan.calls("The weather is sunny.") is None


def test_a_template_defines_the_format_or_none() -> None:
    class Tokenizer:
        chat_template: Any = HERMES_TEMPLATE

    assert template_call_format(Tokenizer()) == "hermes"
    Tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"  # SmolLM2-like
    assert template_call_format(Tokenizer()) is None
    Tokenizer.chat_template = None  # Gemma 3's GGUF brings no template
    assert template_call_format(Tokenizer()) is None


def test_a_stream_sends_the_text_before_the_call_and_holds_a_partial_tag() -> None:
    text = "Checking. " + CALL
    stream = ToolCallStream(ToolCallPlan(forced=None, auto=True))
    deltas = [stream.message(text[i : i + 4], i + 4 >= len(text)) for i in range(0, len(text), 4)]
    content = "".join(d.content or "" for d in deltas)
    (call,) = [c for d in deltas for c in d.tool_calls or []]
    assert content == "Checking. " and call.function.name == "get_weather"
    plain = ToolCallStream(ToolCallPlan(forced=None, auto=True))
    parts = [plain.message("a <tool", False), plain.message("kit", True)]
    assert [p.content for p in parts] == ["a ", "<toolkit"] and not any(p.tool_calls for p in parts)


@pytest.fixture(scope="module")
def client(tiny_variant_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The tiny model with a Hermes-style template that takes tools."""
    directory = tmp_path_factory.mktemp("hermes") / MODEL
    shutil.copytree(tiny_variant_dir, directory)
    (directory / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    engine = TransformersEngine(lambda: load_variant(directory, dtype="fp32"), MODEL, ServerMetrics())
    with TestClient(create_app([engine], engine.metrics), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def test_auto_returns_the_call_the_model_wrote_streamed_or_not(client: TestClient) -> None:
    """The random model is made to write a call (`guided_choice`); `auto` finds it in the text."""
    from openai import OpenAI

    openai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    fields: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "auto",
        "max_tokens": 120,
        "extra_body": {"guided_choice": ["Checking. " + CALL]},
    }
    choice = openai.chat.completions.create(**fields).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, finish = "", [], None
    for chunk in openai.chat.completions.create(**fields, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert content.strip() == "Checking." and finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments or "")) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]

    free = openai.chat.completions.create(**(fields | {"extra_body": {"guided_choice": ["No call."]}}))
    assert free.choices[0].message.content == "No call." and not free.choices[0].message.tool_calls
