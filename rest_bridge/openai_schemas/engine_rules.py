"""Rules the engine enforces, stated in /openapi.json without being checked by the bridge.

Range checks belong to the engine (one place, one message naming the field, the same for gRPC
clients); the bridge forwards values as given. The OpenAPI document must still say what the
server accepts, so generated clients and fuzzers learn the real contract: these helpers add
JSON Schema keywords to a field's or a model's schema and change nothing at validation.

What JSON Schema cannot say is listed in `UNSTATED_RULES`, which the routes' descriptions
repeat: relations between two numbers, the syntax of the embedded languages, and facts of the
served model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

UNSTATED_RULES = (
    "Beyond this schema the engine also refuses (400, naming the field): best_of < n; "
    "min_tokens > max_tokens; n or best_of > 1 with greedy sampling (temperature 0 or "
    "top_k 1, after the model's generation defaults) unless use_beam_search; more than one "
    "of guided_json, guided_regex, guided_choice, guided_grammar and a constraining "
    "response_format; streaming with best_of != n; a guided regex, grammar or JSON schema "
    "or a chat_template that does not compile; a named tool_choice missing from tools; "
    "token ids outside the served vocabulary; prompts plus max_tokens beyond the context; "
    "n, best_of and logprob counts above the server's limits (--max-n, --max-logprobs); "
    "messages the model's chat template refuses; scoring, reranking or classifying with a "
    "model that cannot (a generative model; classify needs a sequence classifier); text_1 "
    "with more than one text but not as many as text_2; truncate_prompt_tokens that leaves "
    "no room beside a pair's special tokens."
)


@dataclass(frozen=True, eq=False)  # hashed by identity: keyword values may be dicts
class _SchemaKeywords:
    keywords: dict[str, Any] = field(default_factory=dict)

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.update(self.keywords)
        return schema


def engine_rule(**keywords: Any) -> Any:
    """An annotation adding JSON Schema keywords (e.g. `minimum=0`) to the document only.

    Put it on the non-null member (`Annotated[int, engine_rule(minimum=0)] | None`) so the
    keyword sits next to that member's type; a keyword the type already has is replaced.
    """
    return _SchemaKeywords(dict(keywords))


def present(field: str) -> dict[str, Any]:
    """JSON Schema for "the client sent `field` with a non-null value" (what `is_set` tests)."""
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def when(condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    return {"if": condition, "then": then}


def must_be(field: str, value: Any) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"const": value}}}


def all_rules(*rules: dict[str, Any]) -> dict[str, Any]:
    """Model-level rules for `json_schema_extra` (several if/then pairs need an allOf)."""
    return {"allOf": list(rules)}


# Continuing the final message and opening a new assistant turn exclude each other; the
# generation prompt is on unless turned off.
CONTINUE_FINAL_MESSAGE_RULE = when(must_be("continue_final_message", True),
                                   must_be("add_generation_prompt", False))


# The engine's sampling ranges, for every route that forwards these fields under any name
# (the OpenAI bodies, /v1/responses, /v1/messages). The values travel as float32 (`format:
# float`): a positive double below float32's smallest arrives as 0, which the engine judges.
TEMPERATURE_RANGE = engine_rule(format="float", minimum=0.0)
TOP_P_RANGE = engine_rule(format="float", exclusiveMinimum=0.0, maximum=1.0)
MIN_P_RANGE = engine_rule(format="float", minimum=0.0, maximum=1.0)
REPETITION_PENALTY_RANGE = engine_rule(format="float", exclusiveMinimum=0.0)
TOP_K_RANGE = engine_rule(minimum=-1)  # -1 (or 0) turns top-k off


def left_to_model_defaults(example: float) -> Any:
    """The `Field` of a sampling field left to the model's generation defaults when absent:
    it has no server default to show, so the document gives a value inside its range as an
    example instead (generators that build a whole body at once start from it)."""
    return Field(default=None, examples=[example])


# /v1/messages runs the chat pipeline: its rules beyond the schema, under Anthropic's names.
MESSAGES_UNSTATED_RULES = (
    "Beyond this schema the server also refuses (400, naming the field): a tool_choice naming "
    "a tool missing from tools; tool_choice auto unless the server runs a tool parser "
    "(--enable-auto-tool-choice, --tool-call-parser); tool_choice any with output_config.format; "
    "a tool's input_schema or output_config.format.schema that does not compile; images from "
    "hosts outside --allowed-media-domains or for a model without image input; prompts plus "
    "max_tokens beyond the context; messages the model's chat template refuses."
)
