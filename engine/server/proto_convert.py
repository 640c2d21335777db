"""protoserve.v1 messages <-> engine types. The only place the engine reads or builds pb."""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from engine.errors import InvalidRequestError
from engine.generation import (
    ChatPrompt,
    GenerationDelta,
    GenerationEvent,
    GenerationFinished,
    GenerationRequest,
    GenerationStarted,
    PositionLogprobs,
    PromptInput,
    TokenLogprob,
)
from engine.core.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.structured.constraint import OutputConstraint

from protoserve.sampling_fields import SAMPLING_FIELDS
from protoserve.v1 import common_pb2, inference_pb2

# SamplingParams fields copied by hand in sampling_from_pb; every other proto field takes the
# plain path from the descriptor (a new optional scalar, repeated or map field needs only a
# same-named SamplingParams attribute). top_k: -1 is vLLM's "disabled", the engine's 0.
SPECIAL_SAMPLING_FIELDS = frozenset({"top_k"})
_PLAIN = SAMPLING_FIELDS.without(SPECIAL_SAMPLING_FIELDS)

FINISH_REASON_TO_PB = {
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
    FinishReason.CANCELLED: inference_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: inference_pb2.FINISH_REASON_DEADLINE,
    FinishReason.CONSTRAINT: inference_pb2.FINISH_REASON_CONSTRAINT,
}


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for name in _PLAIN.scalar:
        if pb.HasField(name):
            kwargs[name] = getattr(pb, name)
    # Empty repeated/map fields are "not given": the engine's default (empty, or None for
    # allowed_token_ids, meaning every token) applies.
    for name in _PLAIN.repeated:
        if values := getattr(pb, name):
            kwargs[name] = tuple(values)
    for name in _PLAIN.map:
        if entries := getattr(pb, name):
            kwargs[name] = dict(entries)
    if pb.HasField("top_k"):
        kwargs["top_k"] = 0 if pb.top_k == -1 else pb.top_k
    if kwargs.get("use_beam_search") and "temperature" not in kwargs:
        # Beam search ranks by the model's log-probabilities (temperature 0); the sampling
        # default of 1.0 would make every beam request without a temperature an error.
        kwargs["temperature"] = 0.0
    return SamplingParams(**kwargs)


def _logprob_to_pb(logprob: TokenLogprob) -> inference_pb2.TokenLogprob:
    return inference_pb2.TokenLogprob(
        token_id=logprob.token_id, logprob=logprob.logprob, token=logprob.token, rank=logprob.rank
    )


def logprobs_to_pb(entry: PositionLogprobs | None) -> inference_pb2.TokenLogprobs:
    """None (the first prompt position) becomes an empty entry without `chosen`."""
    if entry is None:
        return inference_pb2.TokenLogprobs()
    return inference_pb2.TokenLogprobs(
        chosen=_logprob_to_pb(entry.chosen), top=[_logprob_to_pb(t) for t in entry.top]
    )


def _struct_to_dict(struct: Any) -> dict[str, Any]:
    return json_format.MessageToDict(struct, preserving_proto_field_name=True)


def message_to_dict(message: common_pb2.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role}
    which = message.WhichOneof("content")
    if which == "text":
        out["content"] = message.text
    elif which == "parts":
        out["content"] = [
            json_format.MessageToDict(part, preserving_proto_field_name=True)
            | {"type": part.WhichOneof("part")}
            for part in message.parts.parts
        ]
    else:
        out["content"] = None
    if message.HasField("name"):
        out["name"] = message.name
    if message.HasField("tool_call_id"):
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": c.type or "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in message.tool_calls
        ]
    return out


def chat_from_pb(chat: common_pb2.ChatInput) -> ChatPrompt:
    return ChatPrompt(
        messages=[message_to_dict(m) for m in chat.messages],
        add_generation_prompt=(
            chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        ),
        continue_final_message=chat.continue_final_message,
        chat_template=chat.chat_template if chat.HasField("chat_template") else None,
        chat_template_kwargs=(
            _struct_to_dict(chat.chat_template_kwargs) if chat.HasField("chat_template_kwargs") else None
        ),
        # tool_choice "none" means the model must not see the tools at all.
        tools=(
            None if chat.tool_choice == "none" else [_struct_to_dict(t) for t in chat.tools] or None
        ),
        documents=[_struct_to_dict(d) for d in chat.documents] or None,
    )


def generate_request_from_pb(pb: inference_pb2.GenerateRequest, request_id: str) -> GenerationRequest:
    which = pb.WhichOneof("input")
    if which == "text":
        prompt = PromptInput(text=pb.text)
    elif which == "token_ids":
        prompt = PromptInput(token_ids=list(pb.token_ids.ids))
    elif which == "chat":
        prompt = PromptInput(chat=chat_from_pb(pb.chat))
    else:
        raise InvalidRequestError("one of text, token_ids or chat is required", field="input")
    constraint = constraint_from_pb(pb.constraint) if pb.HasField("constraint") else None
    # The engine's gRPC boundary: the one place served sampling params are validated (the
    # input processor and the beam search driver take them as valid).
    sampling = sampling_from_pb(pb.sampling)
    sampling.validate()
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        sampling_params=sampling,
        add_special_tokens=pb.add_special_tokens if pb.HasField("add_special_tokens") else None,
        priority=pb.priority,
        cache_salt=pb.cache_salt,
        return_text=pb.return_text if pb.HasField("return_text") else True,
        constraint=constraint,
    )


def constraint_from_pb(pb: common_pb2.OutputConstraint) -> OutputConstraint | None:
    """The wire's oneof -> the engine's constraint; a message without a kind (only a backend
    or whitespace pattern) constrains nothing. Its shape is validated here, once; the backend
    checks its grammar before the request queues (engine.structured.validator)."""
    which = pb.WhichOneof("kind")
    if which is None:
        return None
    kwargs: dict[str, Any] = {}
    if which == "choice":
        kwargs["choice"] = tuple(pb.choice.choices)
    elif which == "json_object":
        if not pb.json_object:
            return None
        kwargs["json_object"] = True
    else:
        kwargs[which] = getattr(pb, which)
    constraint = OutputConstraint(
        **kwargs,
        whitespace_pattern=pb.whitespace_pattern if pb.HasField("whitespace_pattern") else None,
        backend=pb.backend if pb.HasField("backend") and pb.backend else None,
    )
    constraint.validate()
    return constraint


def event_to_pb(event: GenerationEvent, return_prompt_token_ids: bool) -> inference_pb2.GenerateResponse:
    if isinstance(event, GenerationDelta):
        return inference_pb2.GenerateResponse(
            delta=inference_pb2.GenerateDelta(
                index=event.index,
                token_ids=event.token_ids,
                text=event.text,
                logprobs=[logprobs_to_pb(e) for e in event.logprobs or ()],
                last=event.last,
            )
        )
    if isinstance(event, GenerationFinished):
        finished = inference_pb2.GenerateFinished(
            index=event.index,
            reason=FINISH_REASON_TO_PB[event.reason],
            completion_tokens=event.num_output_tokens,
        )
        if event.stop_string is not None:
            finished.stop_string = event.stop_string
        elif event.stop_token_id is not None:
            finished.stop_token_id = event.stop_token_id
        if event.message:
            finished.message = event.message
        return inference_pb2.GenerateResponse(finished=finished)
    assert isinstance(event, GenerationStarted)
    started = inference_pb2.GenerateStarted(
        request_id=event.request_id,
        prompt_tokens=len(event.prompt_token_ids),
        cached_tokens=event.num_cached_tokens,
        prompt_text=event.prompt_text or "",
    )
    if return_prompt_token_ids:
        started.prompt_token_ids.extend(event.prompt_token_ids)
    if event.prompt_logprobs is not None:
        started.prompt_logprobs.extend(logprobs_to_pb(e) for e in event.prompt_logprobs)
    return inference_pb2.GenerateResponse(started=started)
