"""`POST /v1/completions` request body."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationError, WithJsonSchema, WrapValidator
from pydantic_core import PydanticCustomError

from rest_bridge.openai_schemas.request_fields import Count, PositiveCount, SamplingFields, TokenId

# Non-empty at every level, as the engine requires: /openapi.json then tells generated
# clients and fuzzers the contract the server enforces.
_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[TokenId], Field(min_length=1)]
PromptValue = (_Text | Annotated[list[_Text], Field(min_length=1)] | _TokenIds
               | Annotated[list[_TokenIds], Field(min_length=1)])


def _validate_prompt(value: Any, handler: Any) -> PromptValue:
    """One readable error for a wrong prompt instead of one per union member."""
    try:
        return handler(value)
    except ValidationError as error:
        raise PydanticCustomError(
            "prompt_type",
            "prompt must be a non-empty string, list of strings, list of token ids or list "
            "of token-id lists, none of them empty (token ids are 32-bit integers)",
        ) from error


Prompt = Annotated[PromptValue, WrapValidator(_validate_prompt)]


class CompletionRequest(SamplingFields):
    """OpenAI completion fields plus vLLM's extra sampling and decoding parameters."""

    prompt: Prompt
    echo: bool | None = False
    # Top-N logprobs per generated token.
    logprobs: Count | None = None
    # OpenAI's completion default; explicit null means "the rest of the context".
    max_tokens: PositiveCount | None = 16
    # Declared so a value can be refused clearly: the engine has no fill-in-the-middle, so
    # the document allows only null.
    suffix: Annotated[str | None, WithJsonSchema({
        "type": "null", "description": "Not supported: any string is refused (400)."})] = None
    add_special_tokens: bool | None = True
