"""`POST /v1/responses` request body (OpenAI's Responses API) and its input items.

Input items, tools and a named tool choice are kept as raw objects in the body and validated
one by one in translation (`translate.py`), so an error can name the exact item
(`input[2].call_id`); /openapi.json still states their shapes (`_stated`). Strict types and
unknown fields accepted, as every request model here.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from rest_bridge.openai_schemas.engine_rules import (
    MIN_P_RANGE,
    REPETITION_PENALTY_RANGE,
    TEMPERATURE_RANGE,
    TOP_K_RANGE,
    TOP_P_RANGE,
    engine_rule,
    left_to_model_defaults,
    must_be,
    present,
    when,
)
from rest_bridge.openai_schemas.request_fields import (
    Int32,
    Int64,
    OpenAIModel,
    PositiveCount,
)

MessageRole = Literal["user", "assistant", "system", "developer"]


class InputTextPart(OpenAIModel):
    """`input_text` (user turns) or `output_text` (assistant turns sent back as input)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputImagePart(OpenAIModel):
    type: Literal["input_image"]
    image_url: Annotated[str, engine_rule(pattern="^(data:|https?://)")]
    detail: str | None = None


class RefusalPart(OpenAIModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputTextPart | InputImagePart | RefusalPart, Field(discriminator="type")]


class MessageItem(OpenAIModel):
    """A message: `{"role", "content"}`, with or without `"type": "message"`."""

    type: Literal["message"] = "message"
    role: MessageRole
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(OpenAIModel):
    """A call the model made earlier (an output item sent back as input)."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIModel):
    """The result of running a function call, for the call with the same `call_id`."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputTextPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(OpenAIModel):
    """Reasoning the model did earlier, sent back as input; chat templates drop earlier
    turns' reasoning, so it does not reach the prompt."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(OpenAIModel):
    """Responses' flat function tool (chat nests the same fields under `function`)."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    """`text.format`: plain text, any JSON object, or JSON held to `schema`."""

    # A json_schema format without its schema has nothing to constrain output with.
    model_config = ConfigDict(json_schema_extra=when(
        must_be("type", "json_schema"), {"required": ["schema"], "properties": {
            "schema": {"type": "object"}}}))

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    # `schema` clashes with a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(OpenAIModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with its $defs written in place (an OpenAPI document keeps its
    own components, so local references would dangle)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            # A discriminator's mapping names $defs too; oneOf states the same without it.
            return {key: resolve(value) for key, value in node.items()
                    if key != "discriminator"}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def _stated(*models: type[BaseModel]) -> WithJsonSchema:
    """The document's schema of a raw object that translation validates as one of `models`."""
    schemas = [_inline_schema(model) for model in models]
    return WithJsonSchema(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})


_InputItemObject = Annotated[dict[str, Any], _stated(
    MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem)]
_ToolObject = Annotated[dict[str, Any], _stated(FunctionTool)]
_ToolChoiceObject = Annotated[dict[str, Any], _stated(FunctionToolChoice)]


# Reasoning items never reach the prompt: without instructions or an earlier response, the
# input needs another item for there to be a conversation at all.
_CONVERSATION_RULE = when(
    {"not": {"anyOf": [present("previous_response_id"), {
        "required": ["instructions"],
        "properties": {"instructions": {"type": "string", "minLength": 1}}}]}},
    {"properties": {"input": {"contains": {"not": must_be("type", "reasoning")}}}})


class ResponsesRequest(OpenAIModel):
    """OpenAI's Responses fields, plus a few of vLLM's sampling and template extras."""

    model_config = ConfigDict(json_schema_extra=_CONVERSATION_RULE)

    model: str | None = None
    input: str | Annotated[list[_InputItemObject], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[_ToolObject] | None = None
    tool_choice: Literal["none", "auto", "required"] | _ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: PositiveCount | None = None
    temperature: Annotated[float, TEMPERATURE_RANGE] | None = left_to_model_defaults(1.0)
    top_p: Annotated[float, TOP_P_RANGE] | None = left_to_model_defaults(1.0)
    stream: bool | None = False
    store: bool | None = True
    # Only foreground responses run here; `background: true` is refused by name.
    background: Annotated[bool, engine_rule(const=False)] | None = False
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    # vLLM extras on its Responses route.
    top_k: Annotated[Int32, TOP_K_RANGE] | None = None
    min_p: Annotated[float, MIN_P_RANGE] | None = left_to_model_defaults(0.0)
    repetition_penalty: Annotated[float, REPETITION_PENALTY_RANGE] | None = (
        left_to_model_defaults(1.0))
    seed: Int64 | None = None
    priority: Int32 | None = None
    cache_salt: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    guided_whitespace_pattern: str | None = None
    request_id: Annotated[str, engine_rule(pattern="^[ -~]{0,256}$")] | None = None
