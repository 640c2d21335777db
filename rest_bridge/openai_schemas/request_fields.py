"""Building blocks shared by the completion and chat request models.

Models validate in pydantic strict mode so wrong JSON types (`"temperature": "hot"`,
`"max_tokens": "ten"`, `"stream": "yes"`) are 400s instead of being coerced. Unknown fields
are kept (extra="allow") and reported by the routes, so newer OpenAI fields never break a client.
Range checks of values belong to the engine; only the proto's integer widths are enforced here,
because a value that does not fit the wire type cannot be forwarded at all. The engine's ranges
are still stated in /openapi.json (engine_rules.py), so the document says what the server takes.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from protoserve.sampling_defaults import SAMPLING_DEFAULTS as _D
from rest_bridge.openai_schemas.engine_rules import all_rules, engine_rule, must_be, present, when

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1



def _integral(value: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (JSON Schema's `integer` says so, and the
    reference server takes it). Other floats stay floats and fail the strict int check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_Integral = BeforeValidator(_integral)
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX), _Integral]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), _Integral]
# A token id travels as int32 on the wire; the engine takes [0, vocabulary size).
TokenId = Annotated[Int32, engine_rule(minimum=0)]
# Counts the engine takes from 0 (logprobs, min_tokens) or from 1 (n, max_tokens).
Count = Annotated[Int32, engine_rule(minimum=0)]
PositiveCount = Annotated[Int32, engine_rule(minimum=1)]
# Sampling floats travel as float32 (`format: float`): a tiny positive double would arrive
# as 0, which is what the engine then judges.
Float32 = Annotated[float, engine_rule(format="float")]
Penalty = Annotated[float, engine_rule(format="float", minimum=-2.0, maximum=2.0)]
# An empty stop string or bad word would match everywhere: the engine refuses them.
StopString = Annotated[str, engine_rule(minLength=1)]


class OpenAIModel(BaseModel):
    """Base of every request model: strict types, unknown fields accepted."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class StreamOptions(OpenAIModel):
    # Present `stream_options` asks for usage unless told otherwise (vLLM behaviour).
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    description: str | None = None
    # `schema` clashes with a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    # A json_schema format without its schema has nothing to constrain output with.
    model_config = ConfigDict(json_schema_extra=when(must_be("type", "json_schema"), {
        "required": ["json_schema"], "properties": {"json_schema": {
            "type": "object", "required": ["schema"], "properties": {"schema": {"type": "object"}},
        }}}))

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GuidedDecodingFields(OpenAIModel):
    """vLLM's guided-decoding extras, shared by completions and chat."""

    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], engine_rule(minItems=1)] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


# Rules between fields of both endpoints, for /openapi.json (translation enforces them).
SAMPLING_RULES = (when(present("stream_options"), must_be("stream", True)),)


class SamplingFields(GuidedDecodingFields):
    """Sampling fields common to both endpoints.

    Sampling defaults are the engine's, from protoserve/sampling_defaults.py, so /openapi.json
    shows what applies; translation forwards only the fields the client actually sent (see
    `model_fields_set`) and the engine applies those same defaults to the rest.
    """

    model_config = ConfigDict(json_schema_extra=all_rules(*SAMPLING_RULES))

    model: str | None = None
    frequency_penalty: Penalty | None = _D.frequency_penalty
    presence_penalty: Penalty | None = _D.presence_penalty
    # Keys are token ids written as JSON object keys.
    logit_bias: Annotated[dict[str, Float32], engine_rule(
        propertyNames={"pattern": "^[0-9]+$"})] | None = None
    n: PositiveCount | None = _D.n
    best_of: PositiveCount | None = _D.best_of
    seed: Int64 | None = _D.seed
    stop: StopString | list[StopString] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, engine_rule(format="float", minimum=0.0)] | None = (
        _D.temperature)
    top_p: Annotated[float, engine_rule(
        format="float", exclusiveMinimum=0.0, maximum=1.0)] | None = _D.top_p
    user: str | None = None
    use_beam_search: bool | None = _D.use_beam_search
    # -1 and 0 both disable top-k.
    top_k: Annotated[Int32, engine_rule(minimum=-1)] | None = _D.top_k
    min_p: Annotated[float, engine_rule(format="float", minimum=0.0, maximum=1.0)] | None = (
        _D.min_p)
    repetition_penalty: Annotated[float, engine_rule(
        format="float", exclusiveMinimum=0.0)] | None = _D.repetition_penalty
    length_penalty: Float32 | None = _D.length_penalty
    stop_token_ids: list[TokenId] | None = Field(default_factory=list)
    include_stop_str_in_output: bool | None = _D.include_stop_str_in_output
    ignore_eos: bool | None = _D.ignore_eos
    min_tokens: Count | None = _D.min_tokens
    skip_special_tokens: bool | None = _D.skip_special_tokens
    spaces_between_special_tokens: bool | None = _D.spaces_between_special_tokens
    truncate_prompt_tokens: PositiveCount | None = _D.truncate_prompt_tokens
    # Refused here: the proto cannot tell an empty list from an absent one, so the engine
    # would never see it and [] would silently mean "every token".
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    bad_words: list[Annotated[str, engine_rule(pattern=r"\S")]] | None = None
    prompt_logprobs: Count | None = _D.prompt_logprobs
    # Logprob tokens as "token_id:<id>" strings (for tokens that are not valid UTF-8 alone).
    return_tokens_as_token_ids: bool | None = None
    priority: Int32 | None = 0
    # Separates tenants in the prefix cache.
    cache_salt: str | None = None

    def is_set(self, name: str) -> bool:
        """True when the client sent `name` with a non-null value."""
        return name in self.model_fields_set and getattr(self, name) is not None
