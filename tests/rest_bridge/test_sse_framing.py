"""SSE framing and the chunk writers, fed with protoserve.v1 events."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.generation import OpenStream
from rest_bridge.openai_schemas.completion import CompletionRequest
from rest_bridge.openai_schemas.responses import ChatCompletionChunk, CompletionStreamResponse
from rest_bridge.routes.route_context import stream_usage_flags
from rest_bridge.sse import SSE_DONE, parse_sse_events, sse_event
from rest_bridge.streams import ChatChunkWriter, CompletionChunkWriter, sse_stream
from rest_bridge.translate.proto_to_openai import ResponseMeta

META = ResponseMeta(id="cmpl-x", created=1, model="m")
Event = inference_pb2.GenerateResponse


def test_sse_event_framing() -> None:
    frame = sse_event({"text": "héllo", "n": [1, 2]})
    assert frame == 'data: {"text":"héllo","n":[1,2]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert parse_sse_events(frame + SSE_DONE) == [{"text": "héllo", "n": [1, 2]}, "[DONE]"]
    with pytest.raises(ValueError):
        parse_sse_events(b"event: ping\n\n")


def delta(index: int, text: str, token_ids: tuple[int, ...] = (7,), last: bool = False) -> Event:
    return Event(delta=inference_pb2.GenerateDelta(index=index, text=text, token_ids=token_ids,
                                                   last=last))


def finished(index: int, reason: int = inference_pb2.FINISH_REASON_STOP, **stop: Any) -> Event:
    return Event(finished=inference_pb2.GenerateFinished(index=index, reason=reason, **stop))


def usage(prompt: int, completion: int) -> Event:
    return Event(usage=common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion))


def open_stream(events: list[Event], error: BaseException | None = None,
                prompt_tokens: int = 3) -> OpenStream:
    async def generate() -> AsyncGenerator[Event, None]:
        for event in events:
            await asyncio.sleep(0)
            yield event
        if error is not None:
            raise error

    started = inference_pb2.GenerateStarted(prompt_tokens=prompt_tokens)
    return OpenStream(started=started, events=generate())


def run_stream(streams: list[OpenStream], writer: Any) -> list[Any]:
    async def drain() -> bytes:
        return b"".join([chunk async for chunk in sse_stream(streams, writer, {})])

    return parse_sse_events(asyncio.run(drain()))


def test_completion_stream_indexes_choices_per_prompt_and_reports_usage() -> None:
    # No delta marked last (an engine that does not mark them): each finish is a chunk of
    # its own.
    streams = [
        open_stream([delta(0, "a"), delta(1, "b"), finished(0, stop_string="END"),
                     finished(1, stop_token_id=2), usage(3, 2)]),
        open_stream([delta(1, "c"), delta(0, ""), finished(0), finished(1), usage(4, 1)],
                    prompt_tokens=4),
    ]
    writer = CompletionChunkWriter(META, streams, choices_per_prompt=2, echo_texts=None,
                                   want_logprobs=False, include_usage=True,
                                   continuous_usage=False)
    *chunks, usage_chunk, done = run_stream(streams, writer)
    assert done == "[DONE]"
    for chunk in [*chunks, usage_chunk]:
        CompletionStreamResponse.model_validate(chunk)
    texts = [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks
             if c["choices"][0]["finish_reason"] is None]
    # The empty delta is skipped; indices are prompt_index * n + choice index.
    assert sorted(texts) == [(0, "a"), (1, "b"), (3, "c")]
    finishes = {c["choices"][0]["index"]: c["choices"][0]["stop_reason"] for c in chunks
                if c["choices"][0]["finish_reason"] == "stop"}
    assert finishes == {0: "END", 1: 2, 2: None, 3: None}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 7
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == 10


def test_chat_stream_role_first_then_content_then_finish() -> None:
    streams = [open_stream([delta(0, "Hi"), delta(0, " there", last=True), finished(0)])]
    writer = ChatChunkWriter(META, streams, choices=1, role="assistant", echo_text=None,
                             want_logprobs=False, include_usage=False, continuous_usage=False)
    chunks = run_stream(streams, writer)
    assert chunks[-1] == "[DONE]"
    bodies = chunks[:-1]
    for chunk in bodies:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    deltas = [chunk["choices"][0]["delta"] for chunk in bodies]
    # The last content chunk carries the finish reason: no empty finish chunk after it.
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "Hi"},
                      {"content": " there"}]
    assert [chunk["choices"][0]["finish_reason"] for chunk in bodies] == [None, None, "stop"]


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        (None, (False, False)),
        ({}, (True, False)),
        ({"include_usage": False, "continuous_usage_stats": True}, (False, False)),
        ({"include_usage": True, "continuous_usage_stats": True}, (True, True)),
    ],
)
def test_stream_options_flags(options: dict[str, Any] | None, flags: tuple[bool, bool]) -> None:
    body = CompletionRequest.model_validate({"prompt": "x", "stream": True,
                                             "stream_options": options})
    assert stream_usage_flags(body) == flags


def test_continuous_usage_counts_tokens_as_they_stream() -> None:
    streams = [open_stream([delta(0, "a", (1, 2)), delta(0, "b", last=True), finished(0)])]
    writer = ChatChunkWriter(META, streams, choices=1, role="assistant", echo_text="pre",
                             want_logprobs=False, include_usage=True, continuous_usage=True)
    chunks = run_stream(streams, writer)[:-1]
    completion_counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    # role chunk, echo chunk, "a" (2 tokens), "b" with the finish, final usage: no chunk
    # repeats a count
    assert completion_counts == [0, 0, 2, 3, 3]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[1]["choices"][0]["delta"] == {"content": "pre"}


def test_an_error_after_the_first_byte_becomes_an_error_event_then_done() -> None:
    failure = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), details="KV cache full")
    streams = [open_stream([delta(0, "a")], error=failure)]
    writer = CompletionChunkWriter(META, streams, choices_per_prompt=1, echo_texts=None,
                                   want_logprobs=False, include_usage=True,
                                   continuous_usage=False)
    chunks = run_stream(streams, writer)
    assert chunks[0]["choices"][0]["text"] == "a"
    assert chunks[1] == {"error": {"message": "KV cache full", "type": "rate_limit_error",
                                   "param": None, "code": None}}
    assert chunks[2] == "[DONE]" and len(chunks) == 3


def test_an_unexpected_error_is_reported_without_internals() -> None:
    streams = [open_stream([], error=RuntimeError("secret internals"))]
    writer = ChatChunkWriter(META, streams, choices=1, role="assistant", echo_text=None,
                             want_logprobs=False, include_usage=False, continuous_usage=False)
    chunks = run_stream(streams, writer)
    assert chunks[-2]["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(chunks)


def test_completion_logprobs_offsets_follow_the_echoed_prompt() -> None:
    logprob_delta = delta(0, " w", last=True)
    logprob_delta.delta.logprobs.append(inference_pb2.TokenLogprobs(
        chosen=inference_pb2.TokenLogprob(token_id=7, token=" w", logprob=float("-inf")),
        top=[inference_pb2.TokenLogprob(token_id=8, token=" v", logprob=-1.0)]))
    streams = [open_stream([logprob_delta, finished(0)])]
    writer = CompletionChunkWriter(META, streams, choices_per_prompt=1, echo_texts=["ab"],
                                   want_logprobs=True, include_usage=False,
                                   continuous_usage=False)
    echo, token, done = run_stream(streams, writer)
    assert echo["choices"][0]["text"] == "ab"
    # The chosen token heads its top_logprobs, as on the reference server.
    assert token["choices"][0]["logprobs"] == {
        "text_offset": [2], "token_logprobs": [-9999.0], "tokens": [" w"],
        "top_logprobs": [{" w": -9999.0, " v": -1.0}]}
    assert token["choices"][0]["finish_reason"] == "stop" and done == "[DONE]"


def _choice(writer: Any, event: Event) -> dict[str, Any] | None:
    """The one choice of the chunk `event` makes at once, or None when it makes none yet."""
    frame = writer.on_event(0, event)
    return None if frame is None else parse_sse_events(frame)[0]["choices"][0]


def test_only_a_last_delta_waits_and_only_for_its_own_finish() -> None:
    writer = CompletionChunkWriter(META, [open_stream([])], choices_per_prompt=2,
                                   echo_texts=None, want_logprobs=False, include_usage=False,
                                   continuous_usage=False)
    # Any other delta is a chunk at once.
    assert _choice(writer, delta(0, "a")) == {
        "index": 0, "text": "a", "logprobs": None, "finish_reason": None, "stop_reason": None}
    assert _choice(writer, delta(0, "b", last=True)) is None
    assert _choice(writer, delta(1, "x", last=True)) is None
    # Each choice's finish takes its own held delta, whatever order they come in.
    assert _choice(writer, finished(1, reason=inference_pb2.FINISH_REASON_LENGTH)) == {
        "index": 1, "text": "x", "logprobs": None, "finish_reason": "length",
        "stop_reason": None}
    assert _choice(writer, finished(0, stop_string="END")) == {
        "index": 0, "text": "b", "logprobs": None, "finish_reason": "stop",
        "stop_reason": "END"}
    assert list(writer.closing()) == []


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_finish_no_token_caused_is_a_chunk_of_its_own(endpoint: str) -> None:
    aborted = finished(0, reason=inference_pb2.FINISH_REASON_ABORT)
    streams = [open_stream([delta(0, "a"), aborted])]
    if endpoint == "completions":
        writer: Any = CompletionChunkWriter(
            META, streams, choices_per_prompt=1, echo_texts=None, want_logprobs=False,
            include_usage=False, continuous_usage=False)
    else:
        writer = ChatChunkWriter(META, streams, choices=1, role="assistant", echo_text=None,
                                 want_logprobs=False, include_usage=False,
                                 continuous_usage=False)
    *chunks, finish, done = run_stream(streams, writer)
    assert done == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] is None
    field, nothing = ("text", "") if endpoint == "completions" else ("delta", {})
    assert finish["choices"][0]["finish_reason"] == "abort"
    assert finish["choices"][0][field] == nothing


def test_a_last_delta_whose_finish_never_comes_is_still_sent() -> None:
    streams = [open_stream([delta(0, "a", last=True)])]
    writer = ChatChunkWriter(META, streams, choices=1, role="assistant", echo_text=None,
                             want_logprobs=True, include_usage=False, continuous_usage=False)
    role, content, done = run_stream(streams, writer)
    assert content["choices"][0]["delta"] == {"content": "a"}
    assert content["choices"][0]["finish_reason"] is None and done == "[DONE]"
