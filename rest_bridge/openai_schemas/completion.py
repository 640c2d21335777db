"""`POST /v1/completions` request body."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from rest_bridge.openai_schemas.common import Int32, SamplingFields, TokenId

PromptValue = str | list[str] | list[TokenId] | list[list[TokenId]]


def _validate_prompt(value: Any, handler: Any) -> PromptValue:
    """One readable error for a wrong prompt instead of one per union member."""
    try:
        return handler(value)
    except ValidationError as error:
        raise PydanticCustomError(
            "prompt_type",
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (token ids are 32-bit integers)",
        ) from error


Prompt = Annotated[PromptValue, WrapValidator(_validate_prompt)]


class CompletionRequest(SamplingFields):
    """OpenAI completion fields plus vLLM's extra sampling and decoding parameters."""

    prompt: Prompt
    echo: bool | None = False
    # Top-N logprobs per generated token.
    logprobs: Int32 | None = None
    # OpenAI's completion default; explicit null means "the rest of the context".
    max_tokens: Int32 | None = 16
    # Declared so a value can be refused clearly: the engine has no fill-in-the-middle.
    suffix: str | None = None
    add_special_tokens: bool | None = True
