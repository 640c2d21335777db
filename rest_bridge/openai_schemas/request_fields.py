"""Building blocks shared by the completion and chat request models.

Models validate in pydantic strict mode so wrong JSON types (`"temperature": "hot"`,
`"max_tokens": "ten"`, `"stream": "yes"`) are 400s instead of being coerced. Unknown fields
are kept (extra="allow") and reported by the routes, so newer OpenAI fields never break a client.
Range checks of values belong to the engine; only the proto's integer widths are enforced here,
because a value that does not fit the wire type cannot be forwarded at all.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protoserve.sampling_defaults import SAMPLING_DEFAULTS as _D

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# A token id travels as int32 on the wire.
TokenId = Int32


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
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class GuidedDecodingFields(OpenAIModel):
    """vLLM's guided-decoding extras, shared by completions and chat."""

    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class SamplingFields(GuidedDecodingFields):
    """Sampling fields common to both endpoints.

    Sampling defaults are the engine's, from protoserve/sampling_defaults.py, so /openapi.json
    shows what applies; translation forwards only the fields the client actually sent (see
    `model_fields_set`) and the engine applies those same defaults to the rest.
    """

    model: str | None = None
    frequency_penalty: float | None = _D.frequency_penalty
    presence_penalty: float | None = _D.presence_penalty
    logit_bias: dict[str, float] | None = None
    n: Int32 | None = _D.n
    best_of: Int32 | None = _D.best_of
    seed: Int64 | None = _D.seed
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = _D.temperature
    top_p: float | None = _D.top_p
    user: str | None = None
    use_beam_search: bool | None = _D.use_beam_search
    top_k: Int32 | None = _D.top_k
    min_p: float | None = _D.min_p
    repetition_penalty: float | None = _D.repetition_penalty
    length_penalty: float | None = _D.length_penalty
    stop_token_ids: list[TokenId] | None = Field(default_factory=list)
    include_stop_str_in_output: bool | None = _D.include_stop_str_in_output
    ignore_eos: bool | None = _D.ignore_eos
    min_tokens: Int32 | None = _D.min_tokens
    skip_special_tokens: bool | None = _D.skip_special_tokens
    spaces_between_special_tokens: bool | None = _D.spaces_between_special_tokens
    truncate_prompt_tokens: Int32 | None = _D.truncate_prompt_tokens
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: Int32 | None = _D.prompt_logprobs
    # Logprob tokens as "token_id:<id>" strings (for tokens that are not valid UTF-8 alone).
    return_tokens_as_token_ids: bool | None = None
    priority: Int32 | None = 0
    # Separates tenants in the prefix cache.
    cache_salt: str | None = None

    def is_set(self, name: str) -> bool:
        """True when the client sent `name` with a non-null value."""
        return name in self.model_fields_set and getattr(self, name) is not None
