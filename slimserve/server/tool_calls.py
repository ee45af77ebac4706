"""Tool calls: the JSON decoded for a required or named call, shaped as OpenAI's `message.tool_calls` and
its stream deltas.

A named `tool_choice` decodes the function's arguments alone (the output is the arguments JSON); `required`
decodes an array of `{"name", "parameters"}` objects, one per call, as vLLM does
(`ChatCompletionRequest.tool_constraint`). With `auto` or `none` the output is text: the tools reach the
model through its chat template where the template takes them, and no call is parsed out of the text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from slimserve.server.structured_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall


@dataclass
class ToolCallPlan:
    """How a constrained output becomes calls: `forced` names the function of a named tool_choice; None is
    `required`, an array of calls."""

    forced: str | None

    def calls(self, text: str) -> list[ToolCall] | None:
        """The calls in a finished output; None when it is not a complete call (cut off by max_tokens)."""
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


@dataclass
class ToolCallStream:
    """One choice's stream: a named call streams its arguments as they are decoded (the first delta carries
    the id, type and name); `required` calls are sent whole when the output is complete, one delta each."""

    plan: ToolCallPlan
    text: str = ""
    started: bool = False
    ids: list[str] = field(default_factory=list)

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
