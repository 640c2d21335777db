"""OpenAI request bodies -> GenerateRequest messages (one per prompt)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.errors import invalid_request
from rest_bridge.openai_schemas.chat import ChatCompletionRequest
from rest_bridge.openai_schemas.request_fields import SamplingFields
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.chat_options import ChatOptions
from rest_bridge.translate.chat_input import chat_input_from
from rest_bridge.translate.sampling import (
    constraint_field_aliases,
    output_constraint_from,
    sampling_params_from,
)
from rest_bridge.translate.tool_choice import ToolPlan

# OpenAI's completion default; the engine's own default is "the rest of the context".
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """The Generate calls one OpenAI request fans out to.

    `field_aliases` renames proto field names in engine errors back to the OpenAI field the
    client actually sent (e.g. chat `top_logprobs` travels as SamplingParams.logprobs).
    """

    requests: tuple[inference_pb2.GenerateRequest, ...]
    choices_per_prompt: int
    field_aliases: Mapping[str, str] = field(default_factory=dict)
    # Logprob tokens become "token_id:<id>" (return_tokens_as_token_ids).
    tokens_as_ids: bool = False


def check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise invalid_request(
            "stream_options may only be given together with stream=true", param="stream_options"
        )
    # The best of best_of candidates is known only at the end: nothing to stream before.
    # Beam search (best_of = beam width) streams all of its choices at the end instead.
    if (
        body.stream
        and body.is_set("best_of")
        and body.best_of != _choices(body)
        and not body.use_beam_search
    ):
        raise invalid_request("best_of must equal n when streaming", param="best_of")


def completion_to_plan(body: CompletionRequest, request_id: str,
                       tokens_as_ids_default: bool = False) -> GenerationPlan:
    check_stream_options(body)
    if body.suffix is not None:
        # Fill-in-the-middle is not built; the reference server refuses it with this message.
        raise invalid_request("suffix is not currently supported", param="suffix")
    if "max_tokens" in body.model_fields_set:
        max_tokens = body.max_tokens
    else:
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    logprobs = body.logprobs if body.is_set("logprobs") else None
    sampling = sampling_params_from(body, max_tokens=max_tokens, logprobs=logprobs)
    if body.echo and logprobs is not None:
        # Echoed prompt tokens carry logprobs too: ask the engine to score the prompt.
        sampling.prompt_logprobs = max(logprobs, sampling.prompt_logprobs)
    constraint = output_constraint_from(body)
    prompts = _split_prompts(body.prompt)
    requests = []
    for index, prompt in enumerate(prompts):
        # Sub-requests of a batch get distinct engine ids that still share the client's id.
        sub_request_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
        request = _base_request(body, sub_request_id, sampling, constraint)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        requests.append(request)
    return GenerationPlan(
        requests=tuple(requests),
        choices_per_prompt=_choices(body),
        field_aliases=constraint_field_aliases(body),
        tokens_as_ids=_tokens_as_ids(body, tokens_as_ids_default),
    )


def chat_to_plan(
    body: ChatCompletionRequest,
    request_id: str,
    options: ChatOptions | None = None,
    tools: ToolPlan | None = None,
) -> GenerationPlan:
    check_stream_options(body)
    options = options or ChatOptions()
    tools = tools or ToolPlan(send_tools=True)
    aliases: dict[str, str] = constraint_field_aliases(body)

    max_tokens = body.max_completion_tokens
    if max_tokens is not None:
        aliases["max_tokens"] = "max_completion_tokens"
        # The deprecated field loses to the new one, but a value the document refuses is
        # refused either way: nothing accepted is silently ignored.
        if body.max_tokens is not None and body.max_tokens < 1:
            raise invalid_request(
                f"max_tokens must be at least 1, got {body.max_tokens}", param="max_tokens")
    else:
        max_tokens = body.max_tokens
    logprobs: int | None = None
    if body.is_set("top_logprobs"):
        if not body.logprobs:
            raise invalid_request(
                "top_logprobs needs logprobs set to true", param="top_logprobs"
            )
        logprobs = body.top_logprobs
        aliases["logprobs"] = "top_logprobs"
    elif body.logprobs:
        logprobs = 0
    sampling = sampling_params_from(body, max_tokens=max_tokens, logprobs=logprobs)
    constraint = output_constraint_from(body)
    if tools.constraint is not None:
        if constraint is not None:
            raise invalid_request(
                "a named or required tool_choice cannot be combined with guided decoding or "
                "response_format", param="tool_choice")
        constraint = common_pb2.OutputConstraint()
        constraint.CopyFrom(tools.constraint)
        # The guided_* options that shape (rather than choose) a constraint still apply.
        if body.is_set("guided_whitespace_pattern"):
            constraint.whitespace_pattern = body.guided_whitespace_pattern or ""
        if body.is_set("guided_decoding_backend"):
            constraint.backend = body.guided_decoding_backend or ""
    request = _base_request(body, request_id, sampling, constraint)
    request.chat.CopyFrom(chat_input_from(body, options, send_tools=tools.send_tools))
    if tools.parsing is not None:
        # The engine reads reasoning and tool calls (and keeps special-token markers).
        request.parsing.CopyFrom(tools.parsing)
    return GenerationPlan(
        requests=(request,),
        choices_per_prompt=_choices(body),
        field_aliases=aliases,
        tokens_as_ids=_tokens_as_ids(body, options.return_tokens_as_token_ids),
    )


def _tokens_as_ids(body: SamplingFields, server_default: bool) -> bool:
    """The request's return_tokens_as_token_ids when it sets one, else the server's."""
    requested = body.return_tokens_as_token_ids
    return server_default if requested is None else requested


def _base_request(
    body: SamplingFields,
    request_id: str,
    sampling: common_pb2.SamplingParams,
    constraint: common_pb2.OutputConstraint | None,
) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(request_id=request_id, model=body.model or "")
    request.sampling.CopyFrom(sampling)
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    if body.is_set("priority"):
        request.priority = body.priority or 0
    if body.is_set("cache_salt"):
        request.cache_salt = body.cache_salt or ""
    add_special_tokens = getattr(body, "add_special_tokens", None)
    if body.is_set("add_special_tokens") and add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def _split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One entry per Generate call: a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        # Forwarded so the engine reports the empty prompt with its usual error.
        return [""]
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _choices(body: SamplingFields) -> int:
    # n < 1 is the engine's to reject; the index arithmetic only needs a positive stride.
    return body.n if body.n is not None and body.n > 0 else 1
