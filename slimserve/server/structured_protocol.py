"""The wire types of structured outputs and tool calls, in the reference's field order: OpenAI's
`response_format`, `tools` and `tool_choice`, the calls a response carries, and vLLM's extensions that name a
constraint (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, `structured_outputs`).

Each becomes one `structured.Constraint`; a value the grammar library cannot compile is a `SchemaError` naming
its field, which the app turns into a 400 (`errors`).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from slimserve.server.structured import Constraint, SchemaError


class OpenAIModel(BaseModel):
    """A request body or part of one: unknown fields kept (the app logs them), values never coerced."""

    model_config = ConfigDict(extra="allow", strict=True)


class JsonSchemaFormat(OpenAIModel):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = Field(
        None, description="Accepted either way: the output is decoded under the schema, so it always holds."
    )


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError(
                "missing", "response_format.json_schema is required when type is 'json_schema'", {}
            )
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return Constraint.json_object("response_format")
        assert self.json_schema is not None  # checked by `_schema_given`
        return Constraint.json_schema(self.json_schema.schema_, "response_format.json_schema.schema")


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def tool_constraint(tools: list[Tool], choice: ToolChoice | None, parallel: bool | None) -> Constraint | None:
    """The JSON a required or named tool call is decoded under: the function's parameters (named), or an array
    of one or more `{"name", "parameters"}` calls of the tools (required, as vLLM does); None for `auto`/`none`."""
    if isinstance(choice, NamedToolChoice):
        index = next(i for i, t in enumerate(tools) if t.function.name == choice.function.name)
        return Constraint.json_schema(tools[index].function.parameters, f"tools.{index}.function.parameters")
    if choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if parallel is False:
        schema["maxItems"] = 1
    return Constraint.json_schema(schema, "tools")


STRUCTURED_OUTPUTS_KINDS = ("json", "regex", "choice", "grammar", "json_object")
"""vLLM `structured_outputs` keys that name a constraint (at most one per request)."""

STRUCTURED_OUTPUTS_KEYS = frozenset(
    {*STRUCTURED_OUTPUTS_KINDS, "disable_any_whitespace", "disable_additional_properties"}
)
"""vLLM `structured_outputs` keys this server takes (structural_tag and the backend switches are refused)."""


class StructuredFields(OpenAIModel):
    """The constraint fields both endpoints take: OpenAI's `response_format`, vLLM's `guided_*` and
    `structured_outputs` forms (extensions)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's form of a json_schema (extension).")
    guided_regex: str | None = Field(None, description="The output matches this regex (extension, as vLLM).")
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = Field(
        None, description="The output is one of these strings (extension, as vLLM)."
    )
    guided_grammar: str | None = Field(
        None, description="The output follows this EBNF grammar, xgrammar's dialect (extension, as vLLM)."
    )
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's structured outputs: one of json, regex, choice, grammar, json_object (extension)."
    )

    @field_validator("structured_outputs")
    @classmethod
    def _known_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        other = sorted(set(value or {}) - STRUCTURED_OUTPUTS_KEYS)
        if other:
            raise PydanticCustomError(
                "unsupported",
                "structured_outputs.{key} is not supported by this server yet (json, regex, choice, grammar and "
                "json_object are)",
                {"key": other[0], "param": "structured_outputs"},
            )
        return value

    def constraints_given(self) -> list[str]:
        """The fields that name a constraint (`structured_outputs.regex`, `guided_json`, ...), in field order."""
        given = [
            name
            for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
            if getattr(self, name) is not None
        ]
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, "response_format")
        outputs = self.structured_outputs or {}
        given += [
            f"structured_outputs.{key}" for key in STRUCTURED_OUTPUTS_KINDS if outputs.get(key) not in (None, False)
        ]
        return given

    def constraint(self) -> Constraint | None:
        """What the output must be, from whichever field names it (at most one may); a value that cannot be
        one is a `SchemaError` naming its field."""
        given = self.constraints_given()
        if len(given) > 1:
            raise SchemaError(f"{given[1]}: give one of {', '.join(given)}, not several", given[1])
        if not given:
            return None
        param = given[0]
        if param == "response_format":
            assert self.response_format is not None
            return self.response_format.constraint()
        key = param.removeprefix("structured_outputs.").removeprefix("guided_")
        value = (self.structured_outputs or {}).get(key) if param.startswith("structured") else getattr(self, param)
        if key == "json":
            return Constraint.json_schema(_schema_value(value, param), param)
        if key == "json_object":
            return Constraint.json_object(param)
        if key == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise SchemaError(f"{param}: choices must be a non-empty list of strings", param)
            return Constraint.choice(value, param)
        if not isinstance(value, str):
            raise SchemaError(f"{param}: must be a string", param)
        return Constraint("regex" if key == "regex" else "grammar", value, param)


def _schema_value(value: Any, param: str) -> Any:
    """vLLM takes a schema as an object or as its JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise SchemaError(f"{param}: not valid JSON: {exc}", param) from exc


# ---- responses ---------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
