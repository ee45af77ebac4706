"""The OpenAI wire protocol, in the reference's field order.

Bounds live in the types so the OpenAPI schema documents itself. Types are strict where OpenAI's own API
refuses the value (`"stream": "yes"`, `"max_tokens": true` are 400s, not coerced). Text is checked once, at
the edge: a lone surrogate anywhere in a request is a 400 naming the field, never a tokenizer's 500.
Unknown fields are accepted (clients send them) and logged by the app, except those whose meaning would
change the output (`UNSUPPORTED`): they are refused until implemented. `top_k` and `ignore_eos` are
extensions, as in vLLM, and so are vLLM's `guided_*` and `structured_outputs` constraints (json, regex,
choice, grammar), whose types live beside OpenAI's `response_format` and tool types in `structured_protocol`.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from slimserve.server.sampling import MAX_TOP_LOGPROBS
from slimserve.server.structured import Constraint
from slimserve.server.structured_protocol import (
    DeltaToolCall,
    NamedToolChoice,
    OpenAIModel,
    StructuredFields,
    Tool,
    ToolCall,
    ToolChoice,
    tool_constraint,
)

UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # OpenAI's (`functions`/`function_call` are the deprecated form of `tools`)
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "best_of": (1,),
    "suffix": ("",),
    # vLLM's extensions that clients written for it send
    "min_tokens": (0,),
    "min_p": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "length_penalty": (1, 1.0),
    "use_beam_search": (False,),
    "stop_token_ids": ([],),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "prompt_logprobs": (),
    "truncate_prompt_tokens": (),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
}
"""Fields that would change the output, with the values that leave it as this server produces it (null
always does). Any other value is a 400 `unsupported` naming the field, not a 200 that ignored it."""


def _lone_surrogate(value: Any, path: list[str]) -> str | None:
    """The dotted path of the first string (or key) in `value` that is not valid Unicode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return ".".join(path) or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, [*path, str(key)])
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, [*path, str(index)])
            if found is not None:
                return found
    return None


class _RequestModel(OpenAIModel):
    """A request body: checked as a whole for invalid text and unsupported fields before field validation."""

    @model_validator(mode="before")
    @classmethod
    def _edge_checks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        bad = _lone_surrogate(data, [])
        if bad is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{param}: not valid Unicode (a lone surrogate escape such as \\ud800)",
                {"param": bad.encode("utf-8", "replace").decode()},
            )
        for name, harmless in UNSUPPORTED.items():
            value = data.get(name)
            if value is not None and not any(value == ok and type(value) is type(ok) for ok in harmless):
                raise PydanticCustomError("unsupported", "{param} is not supported by this server yet", {"param": name})
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(OpenAIModel):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls, as this server returned them (rendered for templates that take them)."""
    tool_call_id: str | None = None
    """A `tool` turn: the call it answers."""

    def text(self) -> str:
        """The message's text; only text parts are supported (this server serves text-only models)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported; only 'text' is")
            parts.append(part.text)
        return "".join(parts)


NonEmptyText = Annotated[str, Field(min_length=1)]
Stop = NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=4)] | None
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = (
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class _SamplingFields(OpenAIModel):
    """Fields shared by both completion endpoints, in OpenAI's order."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default: the model's, else 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default: the model's, else 1.")
    user: str | None = None
    # extensions
    top_k: int | None = Field(
        None, ge=0, description="Keep only the k most likely tokens; 0 disables (extension). Default: the model's."
    )
    ignore_eos: bool = Field(False, description="Keep generating past EOS (extension, for benchmarks).")
    slimserve: dict[str, Any] | None = Field(
        None,
        description="Routing budget (extension): latency_budget_ms, memory_budget_mb, min_quality; the "
        "X-Latency-Budget-Ms, X-Memory-Budget-Mb and X-Min-Quality headers take precedence.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {token} must be within [-100, 100], got {bias}")
        return value

    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_RequestModel, _SamplingFields, StructuredFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    logprobs: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call under `required`.")
    tool_choice: ToolChoice | None = Field(
        None,
        description="`none`: the model answers in text, with the tools in its prompt where its chat template "
        "takes them; `auto` (the default with tools): the same, and calls the model writes in the template's "
        "format (Hermes `<tool_call>` tags) are returned as tool_calls; `required` or a named function: the "
        "call's arguments are decoded under the function's JSON Schema.",
    )
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs_consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "invalid_value", "top_logprobs requires logprobs to be true", {"param": "top_logprobs"}
            )
        return self

    @model_validator(mode="after")
    def _tool_choice_consistent(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return self
        names = [t.function.name for t in self.tools or []]
        if not names:
            raise PydanticCustomError(
                "invalid_value",
                "tool_choice {choice} requires tools",
                {"param": "tool_choice", "choice": repr(choice if isinstance(choice, str) else choice.function.name)},
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise PydanticCustomError(
                "invalid_value",
                "tool_choice names function {name}, which is not among the tools",
                {"param": "tool_choice", "name": repr(choice.function.name)},
            )
        given = self.constraints_given()
        if given:
            raise PydanticCustomError(
                "invalid_value",
                "{param} cannot be combined with a required tool call: the call's arguments are the JSON",
                {"param": given[0]},
            )
        return self

    def forced_tool(self) -> Tool | None:
        """The function a named tool_choice calls."""
        choice = self.tool_choice
        if not isinstance(choice, NamedToolChoice):
            return None
        return next(t for t in self.tools or [] if t.function.name == choice.function.name)

    def tool_constraint(self) -> Constraint | None:
        """The JSON a required or named tool call is decoded under (`structured_protocol.tool_constraint`)."""
        return tool_constraint(self.tools or [], self.tool_choice, self.parallel_tool_calls)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_RequestModel, _SamplingFields, StructuredFields):
    model: str
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---- responses ---------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)
    """Only when the output is tool calls (as OpenAI: absent otherwise)."""


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(default=None, exclude_if=lambda calls: calls is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "slimserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    slimserve: dict[str, Any] = Field(default_factory=dict, description="The variant's manifest summary.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


HealthStatus = Literal["ok", "degraded", "loading", "unavailable", "shutting_down"]


class HealthResponse(BaseModel):
    status: HealthStatus
    models: dict[str, str] = Field(description="Each variant's state: loading, ready, failed, stopped or unloaded.")
    errors: dict[str, str] | None = Field(None, description="Why each failed variant failed to load.")
