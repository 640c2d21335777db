"""SSE streams of completions and chat: merged engine events -> OpenAI chunks.

One driver (`sse_stream`) owns framing, errors and `[DONE]`; a writer per endpoint turns each
engine event into at most one chunk.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import Protocol

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.errors import BridgeError, error_envelope
from rest_bridge.generation import OpenStream, merge_events, translate_engine_error
from rest_bridge.sse import SSE_DONE, sse_event
from rest_bridge.translate.logprobs import CompletionLogprobsBuilder, chat_logprob_entries
from rest_bridge.translate.proto_to_openai import (
    ResponseMeta,
    UsageTotals,
    chat_chunk,
    completion_chunk,
    finish_reason_name,
    stop_reason_of,
    tool_calls_finish_reason,
    usage_chunk,
)
from rest_bridge.tool_parsers import StreamPiece, ToolCallStream
from rest_bridge.translate.tool_choice import ToolPlan

logger = logging.getLogger(__name__)


def stream_error_payload(error: BaseException) -> dict[str, object]:
    """The envelope sent inside a stream once the 200 has gone out."""
    if isinstance(error, BridgeError):
        return error.envelope()
    # The traceback stays in the log; the client only learns that the server failed.
    logger.error("stream failed", exc_info=error)
    return error_envelope("internal server error", "server_error")


class StreamUsage:
    """Token counts while streaming: running counts for continuous usage stats, replaced by the
    engine's own usage events once every call has reported one."""

    def __init__(self, streams: list[OpenStream]) -> None:
        self._num_streams = len(streams)
        self._running = UsageTotals(
            prompt_tokens=sum(stream.started.prompt_tokens for stream in streams),
            cached_tokens=sum(stream.started.cached_tokens for stream in streams),
        )
        self._reported: list[common_pb2.Usage] = []

    def count(self, delta: inference_pb2.GenerateDelta) -> None:
        self._running.completion_tokens += len(delta.token_ids)

    def record(self, usage: common_pb2.Usage) -> None:
        self._reported.append(usage)

    def current(self) -> UsageTotals:
        return self._running

    def final(self) -> UsageTotals:
        if len(self._reported) < self._num_streams:
            return self._running
        totals = UsageTotals()
        for usage in self._reported:
            totals.add(usage)
        return totals


class ChunkWriter(Protocol):
    def opening(self) -> Iterator[bytes]: ...

    def on_event(self, prompt_index: int, event: inference_pb2.GenerateResponse) -> bytes | None:
        ...

    def closing(self) -> Iterator[bytes]: ...


async def sse_stream(
    streams: list[OpenStream], writer: ChunkWriter, field_aliases: Mapping[str, str]
) -> AsyncGenerator[bytes, None]:
    """Frame the writer's chunks; an error after the first byte becomes an in-stream error
    event. `[DONE]` always ends a stream that was not abandoned by the client."""
    try:
        for opening_chunk in writer.opening():
            yield opening_chunk
        async for prompt_index, event in merge_events(streams):
            chunk = writer.on_event(prompt_index, event)
            if chunk is not None:
                yield chunk
        for closing_chunk in writer.closing():
            yield closing_chunk
    except Exception as error:
        yield sse_event(stream_error_payload(translate_engine_error(error, field_aliases)))
    yield SSE_DONE


class CompletionChunkWriter:
    """`text_completion` chunks; choice index = prompt_index * n + engine choice index."""

    def __init__(
        self,
        meta: ResponseMeta,
        streams: list[OpenStream],
        *,
        choices_per_prompt: int,
        echo_texts: list[str] | None,
        want_logprobs: bool,
        include_usage: bool,
        continuous_usage: bool,
    ) -> None:
        self._meta = meta
        self._n = choices_per_prompt
        self._echo_texts = echo_texts
        self._want_logprobs = want_logprobs
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._usage = StreamUsage(streams)
        # Scored prompt tokens per call (asked for when echo and logprobs go together).
        self._prompt_logprobs = [stream.started.prompt_logprobs for stream in streams]
        # Per choice, the text_offset of its next token. Counted over token texts, as the
        # non-streamed body counts them (a token ending inside a UTF-8 character has a text of
        # its own before the choice's text has it), so that the chunks concatenate to it.
        self._offsets: dict[int, int] = {}

    def opening(self) -> Iterator[bytes]:
        """The echoed prompt of every choice, with the prompt's logprobs in the same shape as
        a non-streamed response."""
        for prompt_index, text in enumerate(self._echo_texts or ()):
            logprobs = None
            next_offset = len(text)
            if self._want_logprobs and self._prompt_logprobs[prompt_index]:
                builder = CompletionLogprobsBuilder()
                builder.extend_echoed_prompt(text, self._prompt_logprobs[prompt_index])
                logprobs = builder.to_dict()
                next_offset = builder.next_offset
            for choice in range(self._n):
                index = prompt_index * self._n + choice
                self._offsets[index] = next_offset
                chunk = completion_chunk(
                    self._meta, index, text, logprobs=logprobs, usage=self._running()
                )
                yield sse_event(chunk)

    def on_event(self, prompt_index: int, event: inference_pb2.GenerateResponse) -> bytes | None:
        kind = event.WhichOneof("event")
        if kind == "delta":
            delta = event.delta
            self._usage.count(delta)
            if not delta.text and not delta.logprobs:
                return None
            index = prompt_index * self._n + delta.index
            logprobs = None
            if self._want_logprobs:
                builder = CompletionLogprobsBuilder(start_offset=self._offsets.get(index, 0))
                builder.extend(delta.logprobs)
                self._offsets[index] = builder.next_offset
                logprobs = builder.to_dict()
            chunk = completion_chunk(
                self._meta, index, delta.text, logprobs=logprobs, usage=self._running()
            )
            return sse_event(chunk)
        if kind == "finished":
            finished = event.finished
            chunk = completion_chunk(
                self._meta,
                prompt_index * self._n + finished.index,
                "",
                finish_reason=finish_reason_name(finished.reason),
                stop_reason=stop_reason_of(finished),
                usage=self._running(),
            )
            return sse_event(chunk)
        if kind == "usage":
            self._usage.record(event.usage)
        return None

    def closing(self) -> Iterator[bytes]:
        if self._include_usage:
            yield sse_event(usage_chunk(self._meta, "text_completion", self._usage.final()))

    def _running(self) -> dict[str, object] | None:
        return self._usage.current().to_dict() if self._continuous_usage else None


class ChatChunkWriter:
    """`chat.completion.chunk`s: a role chunk per choice, content deltas, a finish chunk."""

    def __init__(
        self,
        meta: ResponseMeta,
        streams: list[OpenStream],
        *,
        choices: int,
        role: str,
        echo_text: str | None,
        want_logprobs: bool,
        include_usage: bool,
        continuous_usage: bool,
        tools: ToolPlan | None = None,
    ) -> None:
        self._meta = meta
        self._choices = choices
        self._tools = tools
        # Per choice index: reads tool calls out of the text as it streams.
        self._tool_streams: dict[int, ToolCallStream] = {}
        self._role = role
        self._echo_text = echo_text
        self._want_logprobs = want_logprobs
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._usage = StreamUsage(streams)

    def opening(self) -> Iterator[bytes]:
        for index in range(self._choices):
            delta = {"role": self._role, "content": ""}
            yield sse_event(chat_chunk(self._meta, index, delta, usage=self._running()))
        if self._echo_text:
            for index in range(self._choices):
                delta = {"content": self._echo_text}
                yield sse_event(chat_chunk(self._meta, index, delta, usage=self._running()))

    def on_event(self, prompt_index: int, event: inference_pb2.GenerateResponse) -> bytes | None:
        kind = event.WhichOneof("event")
        if kind == "delta":
            delta = event.delta
            self._usage.count(delta)
            if not delta.text and not delta.logprobs:
                return None
            logprobs = None
            if self._want_logprobs:
                logprobs = {"content": chat_logprob_entries(delta.logprobs)}
            message: dict[str, object] = {"content": delta.text}
            tool_stream = self._tool_stream(delta.index)
            if tool_stream is not None:
                message = _delta_of(tool_stream.feed(delta.text))
                if not message and logprobs is None:
                    return None
            chunk = chat_chunk(
                self._meta, delta.index, message, logprobs=logprobs, usage=self._running()
            )
            return sse_event(chunk)
        if kind == "finished":
            finished = event.finished
            reason = finish_reason_name(finished.reason)
            held = b""
            tool_stream = self._tool_stream(finished.index)
            if tool_stream is not None and self._tools is not None:
                rest = _delta_of(tool_stream.finish())
                if rest:
                    held = sse_event(chat_chunk(self._meta, finished.index, rest,
                                                usage=self._running()))
                reason = tool_calls_finish_reason(reason, self._tools, tool_stream.found_calls)
            chunk = chat_chunk(
                self._meta,
                finished.index,
                {},
                finish_reason=reason,
                stop_reason=stop_reason_of(finished),
                usage=self._running(),
            )
            return held + sse_event(chunk)
        if kind == "usage":
            self._usage.record(event.usage)
        return None

    def closing(self) -> Iterator[bytes]:
        if self._include_usage:
            yield sse_event(usage_chunk(self._meta, "chat.completion.chunk", self._usage.final()))

    def _tool_stream(self, index: int) -> ToolCallStream | None:
        if self._tools is None or self._tools.new_stream is None:
            return None
        stream = self._tool_streams.get(index)
        if stream is None:
            stream = self._tool_streams[index] = self._tools.new_stream()
        return stream

    def _running(self) -> dict[str, object] | None:
        return self._usage.current().to_dict() if self._continuous_usage else None


def _delta_of(piece: StreamPiece) -> dict[str, object]:
    """A chat delta with only what the piece carries (content and/or tool_calls)."""
    delta: dict[str, object] = {}
    if piece.content:
        delta["content"] = piece.content
    if piece.tool_calls:
        delta["tool_calls"] = piece.tool_calls
    return delta
