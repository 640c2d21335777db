"""`/v1/chat/completions/render` and `/v1/completions/render` answers: the reference server's
token-in GenerateRequest (its --enable-scale-out render routes), the request the engine would
run for the body, field names and nesting as the reference writes them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator

from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.openai_schemas.request_fields import OpenAIModel, StreamOptions



def _strict_bool(value: Any) -> Any:
    # Literal[False] alone takes 0 (0 == False); the generating routes' bool is strict.
    if value is not None and not isinstance(value, bool):
        raise ValueError("Input should be a valid boolean")
    return value


# Beam search runs as one-token expansions made on the fly: there is no single token-in
# request to show, so the render bodies refuse it (as the reference's render does).
NoBeamSearch = Annotated[Literal[False] | None, BeforeValidator(_strict_bool)]


class ChatRenderRequest(ChatCompletionRequest):
    """A /v1/chat/completions body, less beam search."""

    use_beam_search: NoBeamSearch = False


class CompletionRenderRequest(CompletionRequest):
    """A /v1/completions body, less beam search."""

    use_beam_search: NoBeamSearch = False


class RenderedSamplingParams(OpenAIModel):
    """Resolved values: the body's, else the model's generation defaults, else the engine's;
    max_tokens fitted to the context left after the prompt. Null means "none" (no seed, no
    logprobs, every token allowed)."""

    n: int
    best_of: int | None
    temperature: float
    top_p: float
    # 0 disables.
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int | None
    max_tokens: int
    min_tokens: int
    stop: list[str]
    stop_token_ids: list[int]
    include_stop_str_in_output: bool
    ignore_eos: bool
    # Token id (as a JSON key) -> bias.
    logit_bias: dict[str, float]
    allowed_token_ids: list[int] | None
    bad_words: list[str]
    logprobs: int | None
    prompt_logprobs: int | None
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    truncate_prompt_tokens: int | None
    # The guided-decoding constraint (json, regex, choice, grammar or json_object, with
    # whitespace_pattern and backend when set); null when output is unconstrained.
    structured_outputs: dict[str, Any] | None


class RenderedGenerateRequest(OpenAIModel):
    request_id: str
    # The prompt the model would be fed: templated, tokenized and truncated.
    token_ids: list[int]
    # Multimodal features: none are rendered here.
    features: None
    sampling_params: RenderedSamplingParams
    model: str | None
    stream: bool
    stream_options: StreamOptions | None
    cache_salt: str | None
    priority: int
