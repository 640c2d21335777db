"""Generate event streams -> OpenAI response bodies and stream chunks (plain dicts).

Dicts, not pydantic models: chunks are built once per token, and `json.dumps` of a small dict
is far cheaper than model validation. `openai_schemas.responses` documents these shapes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.translate.logprobs import (
    CompletionLogprobsBuilder,
    chat_logprob_entries,
    prompt_logprobs_list,
)
from rest_bridge.translate.parsed_output import ParsedChoice
from rest_bridge.translate.tool_choice import ToolPlan

_FinishReason = inference_pb2.FinishReason
# Client cancellation and server aborts look the same to an OpenAI client.
_FINISH_REASON_NAMES: dict[int, str] = {
    _FinishReason.FINISH_REASON_STOP: "stop",
    _FinishReason.FINISH_REASON_LENGTH: "length",
    _FinishReason.FINISH_REASON_ABORT: "abort",
    _FinishReason.FINISH_REASON_CANCELLED: "abort",
    _FinishReason.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_FINISH_REASON_PREFIX = "FINISH_REASON_"


def finish_reason_name(reason: int) -> str | None:
    """OpenAI's finish_reason string; None when the engine reported none."""
    if reason == _FinishReason.FINISH_REASON_UNSPECIFIED:
        return None
    name = _FINISH_REASON_NAMES.get(reason)
    if name is not None:
        return name
    try:
        return _FinishReason.Name(reason).removeprefix(_FINISH_REASON_PREFIX).lower()
    except ValueError:
        # A reason newer than these stubs: still finished, just not nameable here.
        return "unknown"


def stop_reason_of(finished: inference_pb2.GenerateFinished) -> int | str | None:
    """vLLM's stop_reason: the stop token id or stop string that ended the choice."""
    which = finished.WhichOneof("stop")
    if which == "stop_token_id":
        return finished.stop_token_id
    if which == "stop_string":
        return finished.stop_string
    return None


@dataclass(slots=True)
class UsageTotals:
    """Token counts summed over every Generate call of one OpenAI request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, usage: common_pb2.Usage) -> None:
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cached_tokens += usage.cached_tokens

    def to_dict(self, *, prompt_tokens_details: bool) -> dict[str, Any]:
        """The usage object; `prompt_tokens_details` (the prefix cache's share of the prompt)
        only with --enable-prompt-tokens-details, as the reference server sends it."""
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def body_dict(self, *, prompt_tokens_details: bool) -> dict[str, Any]:
        """The usage of a non-streamed body: there the reference server always has the key,
        null when the details are off (streamed usage leaves it out)."""
        usage = self.to_dict(prompt_tokens_details=prompt_tokens_details)
        usage.setdefault("prompt_tokens_details", None)
        return usage


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """Fields repeated on every body and chunk of one response."""

    id: str
    created: int
    model: str


@dataclass(slots=True)
class ChoiceResult:
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[inference_pb2.TokenLogprobs] = field(default_factory=list)
    token_count: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Set once a delta carries the engine's parsed fields (reasoning / tool-call parsers).
    parsed: ParsedChoice | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass(slots=True)
class PromptResult:
    """Everything one Generate call produced, gathered for a non-streamed response."""

    started: inference_pb2.GenerateStarted
    choices: dict[int, ChoiceResult] = field(default_factory=dict)
    usage: common_pb2.Usage | None = None

    def choice(self, index: int) -> ChoiceResult:
        result = self.choices.get(index)
        if result is None:
            result = self.choices[index] = ChoiceResult()
        return result

    def apply(self, event: inference_pb2.GenerateResponse) -> None:
        kind = event.WhichOneof("event")
        if kind == "delta":
            choice = self.choice(event.delta.index)
            choice.text_parts.append(event.delta.text)
            choice.logprobs.extend(event.delta.logprobs)
            choice.token_count += len(event.delta.token_ids)
            if event.delta.HasField("parsed"):
                if choice.parsed is None:
                    choice.parsed = ParsedChoice()
                choice.parsed.add(event.delta.parsed)
        elif kind == "finished":
            choice = self.choice(event.finished.index)
            choice.finish_reason = finish_reason_name(event.finished.reason)
            choice.stop_reason = stop_reason_of(event.finished)
        elif kind == "usage":
            self.usage = event.usage


async def collect_prompt_result(
    started: inference_pb2.GenerateStarted,
    events: AsyncIterator[inference_pb2.GenerateResponse],
    num_choices: int,
) -> PromptResult:
    result = PromptResult(started=started)
    for index in range(num_choices):
        result.choice(index)
    async for event in events:
        result.apply(event)
    return result


def usage_of(results: list[PromptResult]) -> UsageTotals:
    totals = UsageTotals()
    for result in results:
        if result.usage is not None:
            totals.add(result.usage)
        else:
            # Older engines may omit the usage event: count what was seen instead.
            totals.prompt_tokens += result.started.prompt_tokens
            totals.cached_tokens += result.started.cached_tokens
            totals.completion_tokens += sum(
                choice.token_count for choice in result.choices.values()
            )
    return totals


def completion_body(
    meta: ResponseMeta,
    results: list[PromptResult],
    *,
    choices_per_prompt: int,
    echo_texts: list[str] | None,
    want_logprobs: bool,
    prompt_tokens_details: bool = False,
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for prompt_index, result in enumerate(results):
        prefix = echo_texts[prompt_index] if echo_texts is not None else ""
        prompt_logprobs = (
            prompt_logprobs_list(result.started.prompt_logprobs)
            if result.started.prompt_logprobs
            else None
        )
        for index, choice in sorted(result.choices.items()):
            logprobs = None
            if want_logprobs:
                echoed = echo_texts is not None and bool(result.started.prompt_logprobs)
                builder = CompletionLogprobsBuilder(start_offset=0 if echoed else len(prefix))
                if echoed:
                    builder.extend_echoed_prompt(prefix, result.started.prompt_logprobs)
                builder.extend(choice.logprobs)
                logprobs = builder.to_dict()
            choices.append(
                {
                    "index": prompt_index * choices_per_prompt + index,
                    "text": prefix + choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                    "prompt_logprobs": prompt_logprobs,
                }
            )
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_of(results).body_dict(prompt_tokens_details=prompt_tokens_details),
    }


def chat_body(
    meta: ResponseMeta,
    result: PromptResult,
    *,
    role: str,
    echo_text: str | None,
    want_logprobs: bool,
    tools: ToolPlan | None = None,
    prompt_tokens_details: bool = False,
) -> dict[str, Any]:
    """`tools` is accepted for callers' sake: the engine already read reasoning and tool calls
    into each choice's parsed deltas (see translate/parsed_output.py)."""
    choices = []
    for index, choice in sorted(result.choices.items()):
        logprobs = {"content": chat_logprob_entries(choice.logprobs)} if want_logprobs else None
        message: dict[str, Any] = {
            "role": role, "content": (echo_text or "") + choice.text, "tool_calls": []}
        if choice.parsed is not None:
            # OpenAI sends null content next to tool calls when the model said nothing else.
            message.update(choice.parsed.message_fields(echo_text))
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
            }
        )
    prompt_logprobs = result.started.prompt_logprobs
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_of([result]).body_dict(prompt_tokens_details=prompt_tokens_details),
        "prompt_logprobs": prompt_logprobs_list(prompt_logprobs) if prompt_logprobs else None,
    }



def completion_chunk(
    meta: ResponseMeta,
    index: int,
    text: str,
    *,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def chat_chunk(
    meta: ResponseMeta,
    index: int,
    delta: dict[str, Any],
    *,
    logprobs: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    stop_reason: int | str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def usage_chunk(meta: ResponseMeta, object_name: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The final chunk of `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": meta.id,
        "object": object_name,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage,
    }
