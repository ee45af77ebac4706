"""Tool calls: the JSON decoded for a required or named call, or the calls a model wrote in its family's
format under `auto`, shaped as OpenAI's `message.tool_calls` and its stream deltas.

A named `tool_choice` decodes the function's arguments alone (the output is the arguments JSON); `required`
decodes an array of `{"name", "parameters"}` objects, one per call, as vLLM does
(`structured_protocol.tool_constraint`). With `auto` the tools reach the model through its chat template, and
where the template defines a call format the output is searched for calls in it: Hermes's
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen 2/2.5/3, Hermes, SmolLM3 and others write
it; vLLM's `hermes` parser reads the same), the text before the first call staying the message's content. A
template without a call format (SmolLM2-Instruct's takes no tools; Gemma 3's GGUF brings no template) leaves
`auto` as free text, as `none` is always: nothing is parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from slimserve.server.protocol import DeltaMessage
from slimserve.server.structured_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def template_call_format(tokenizer: Any) -> str | None:
    """The call format the tokenizer's chat template teaches the model ("hermes"), None if it defines none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # tokenizers with named templates
        template = template.get("tool_use") or template.get("default")
    return "hermes" if isinstance(template, str) and HERMES_OPEN in template else None


def parse_hermes(text: str) -> list[ToolCall]:
    """The calls written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in `text` (a last call
    whose closing tag was cut off still counts if its JSON is whole); blocks that are not such JSON are text."""
    calls = []
    for match in _HERMES_CALL.finditer(text):
        try:
            item = json.loads(match.group(1))
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            arguments = item.get("arguments", item.get("parameters", {}))
            text_args = arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append(ToolCall(function=FunctionCall(name=item["name"], arguments=text_args)))
    return calls


def _tag_start(text: str) -> int:
    """Length of the longest tail of `text` that begins an opening tag (0: none)."""
    longest = min(len(HERMES_OPEN) - 1, len(text))
    return next((k for k in range(longest, 0, -1) if text.endswith(HERMES_OPEN[:k])), 0)


@dataclass
class ToolCallPlan:
    """How an output becomes calls: `forced` names the function of a named tool_choice; None is `required`,
    an array of calls, or with `auto` the calls the model wrote in the template's format."""

    forced: str | None
    auto: bool = False

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls in a finished output; None when it is not a complete call (cut off by max_tokens)."""
        if self.auto:
            return parse_hermes(text) or None
        if self.forced is not None:
            try:
                json.loads(text)
            except ValueError:
                return None
            return [ToolCall(function=FunctionCall(name=self.forced, arguments=text))]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list):
            return None
        return [
            ToolCall(function=FunctionCall(name=str(item["name"]), arguments=json.dumps(item["parameters"])))
            for item in items
            if isinstance(item, dict) and "name" in item and "parameters" in item
        ] or None

    def content(self, text: str) -> str | None:
        """The message's text beside its calls: what the model wrote before its first call under `auto`."""
        if not self.auto:
            return None
        return text.split(HERMES_OPEN, 1)[0].strip() or None


@dataclass
class ToolCallStream:
    """One choice's stream: a named call streams its arguments as they are decoded (the first delta carries
    the id, type and name); `required` calls, and calls found under `auto`, are sent whole when the output is
    complete, one delta each (under `auto` the text before the first call streams as content)."""

    plan: ToolCallPlan
    text: str = ""
    started: bool = False
    sent: int = 0
    """Characters of `text` already sent as content (`auto`)."""
    ids: list[str] = field(default_factory=list)

    def message(self, text: str, finished: bool) -> DeltaMessage:
        """The delta for the next piece of output."""
        if not self.plan.auto:
            return DeltaMessage(tool_calls=self.delta(text, finished))
        self.text += text
        held = self.text.find(HERMES_OPEN)
        if held < 0:  # hold back a tail that may be the start of an opening tag
            held = len(self.text) - _tag_start(self.text)
        calls = self.plan.calls(self.text) if finished else None
        if finished and not calls:
            held = len(self.text)
        content, self.sent = self.text[self.sent : max(held, self.sent)], max(held, self.sent)
        deltas = [
            DeltaToolCall(
                index=i,
                id=call.id,
                type="function",
                function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
            for i, call in enumerate(calls or [])
        ]
        return DeltaMessage(content=content or None, tool_calls=deltas or None)

    def delta(self, text: str, finished: bool) -> list[DeltaToolCall] | None:
        """The tool-call deltas for the next piece of output (None: nothing to send yet)."""
        self.text += text
        if self.plan.forced is not None:
            if not text and self.started:
                return None
            first = not self.started
            self.started = True
            call = ToolCall(function=FunctionCall(name=self.plan.forced, arguments=""))
            return [
                DeltaToolCall(
                    index=0,
                    id=call.id if first else None,
                    type="function" if first else None,
                    function=DeltaFunctionCall(name=self.plan.forced if first else None, arguments=text),
                )
            ]
        if not finished:
            return None
        calls = self.plan.calls(self.text) or []
        return [
            DeltaToolCall(
                index=i,
                id=call.id,
                type="function",
                function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
            )
            for i, call in enumerate(calls)
        ] or None

    def finish_reason(self, reason: str | None) -> str | None:
        """`tool_calls` for an output that ended as complete calls, else the engine's reason."""
        if reason == "stop" and self.plan.calls(self.text):
            return "tool_calls"
        return reason
