"""SSE streams of completions and chat: merged engine events -> OpenAI chunks.

One driver (`sse_stream`) owns framing, errors and `[DONE]`; a writer per endpoint turns each
engine event into at most one chunk.

As the reference server does, a choice's last content chunk carries its finish_reason. The
engine marks the delta whose tokens ended a choice (`GenerateDelta.last`) and sends that
choice's Finished event right behind it, so a writer holds only that one delta, per choice,
until the Finished event arrives; no other chunk waits. A choice ended by something else than
a token (abort, deadline) has no such delta: its finish comes as a chunk of its own.
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
    usage_chunk,
)
from rest_bridge.translate.parsed_output import delta_message
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

    def __init__(self, streams: list[OpenStream], *, prompt_tokens_details: bool) -> None:
        self._num_streams = len(streams)
        self._prompt_tokens_details = prompt_tokens_details
        self._running = UsageTotals(
            prompt_tokens=sum(stream.started.prompt_tokens for stream in streams),
            cached_tokens=sum(stream.started.cached_tokens for stream in streams),
        )
        self._reported: list[common_pb2.Usage] = []

    def count(self, delta: inference_pb2.GenerateDelta) -> None:
        self._running.completion_tokens += len(delta.token_ids)

    def record(self, usage: common_pb2.Usage) -> None:
        self._reported.append(usage)

    def current(self) -> dict[str, object]:
        return self._running.to_dict(prompt_tokens_details=self._prompt_tokens_details)

    def final(self) -> dict[str, object]:
        totals = self._running
        if len(self._reported) == self._num_streams:
            totals = UsageTotals()
            for usage in self._reported:
                totals.add(usage)
        return totals.to_dict(prompt_tokens_details=self._prompt_tokens_details)


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
        prompt_tokens_details: bool = False,
    ) -> None:
        self._meta = meta
        self._n = choices_per_prompt
        self._echo_texts = echo_texts
        self._want_logprobs = want_logprobs
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._usage = StreamUsage(streams, prompt_tokens_details=prompt_tokens_details)
        # Scored prompt tokens per call (asked for when echo and logprobs go together).
        self._prompt_logprobs = [stream.started.prompt_logprobs for stream in streams]
        # Per choice, the text_offset of its next token. Counted over token texts, as the
        # non-streamed body counts them (a token ending inside a UTF-8 character has a text of
        # its own before the choice's text has it), so that the chunks concatenate to it.
        self._offsets: dict[int, int] = {}
        # Per choice index: its `last` delta, waiting for the Finished event right behind it.
        self._last_deltas: dict[int, inference_pb2.GenerateDelta] = {}

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
            index = prompt_index * self._n + delta.index
            if delta.last:
                self._last_deltas[index] = delta
                return None
            if not delta.text and not delta.logprobs:
                return None
            chunk = completion_chunk(
                self._meta, index, delta.text, logprobs=self._logprobs(index, delta),
                usage=self._running(),
            )
            return sse_event(chunk)
        if kind == "finished":
            finished = event.finished
            index = prompt_index * self._n + finished.index
            last = self._last_deltas.pop(index, None)
            chunk = completion_chunk(
                self._meta,
                index,
                last.text if last is not None else "",
                logprobs=self._logprobs(index, last) if last is not None else None,
                finish_reason=finish_reason_name(finished.reason),
                stop_reason=stop_reason_of(finished),
                usage=self._running(),
            )
            return sse_event(chunk)
        if kind == "usage":
            self._usage.record(event.usage)
        return None

    def closing(self) -> Iterator[bytes]:
        # A last delta whose Finished never came (an engine that ended the stream early):
        # its text still reaches the client.
        for index, delta in sorted(self._last_deltas.items()):
            yield sse_event(completion_chunk(
                self._meta, index, delta.text, logprobs=self._logprobs(index, delta),
                usage=self._running(),
            ))
        self._last_deltas.clear()
        if self._include_usage:
            yield sse_event(usage_chunk(self._meta, "text_completion", self._usage.final()))

    def _logprobs(
        self, index: int, delta: inference_pb2.GenerateDelta
    ) -> dict[str, object] | None:
        """The delta's logprobs, text offsets continuing the choice's earlier chunks."""
        if not self._want_logprobs:
            return None
        builder = CompletionLogprobsBuilder(start_offset=self._offsets.get(index, 0))
        builder.extend(delta.logprobs)
        self._offsets[index] = builder.next_offset
        return builder.to_dict()

    def _running(self) -> dict[str, object] | None:
        return self._usage.current() if self._continuous_usage else None


class ChatChunkWriter:
    """`chat.completion.chunk`s: a role chunk per choice, then content deltas, the last of
    them with the finish reason."""

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
        prompt_tokens_details: bool = False,
    ) -> None:
        self._meta = meta
        self._choices = choices
        # Accepted for callers' sake: the engine's parsed deltas already carry reasoning and
        # tool calls (translate/parsed_output.py).
        self._tools = tools
        self._role = role
        self._echo_text = echo_text
        self._want_logprobs = want_logprobs
        self._include_usage = include_usage
        self._continuous_usage = continuous_usage
        self._usage = StreamUsage(streams, prompt_tokens_details=prompt_tokens_details)
        # Per choice index: its `last` delta, waiting for the Finished event right behind it.
        self._last_deltas: dict[int, inference_pb2.GenerateDelta] = {}

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
            if delta.last:
                self._last_deltas[delta.index] = delta
                return None
            message = _message_of(delta)
            if not delta.logprobs and not (message if delta.HasField("parsed") else delta.text):
                return None
            logprobs = self._logprobs(delta)
            chunk = chat_chunk(
                self._meta, delta.index, message, logprobs=logprobs, usage=self._running()
            )
            return sse_event(chunk)
        if kind == "finished":
            return sse_event(self._finish_chunk(event.finished))
        if kind == "usage":
            self._usage.record(event.usage)
        return None

    def closing(self) -> Iterator[bytes]:
        # A last delta whose Finished never came (an engine that ended the stream early):
        # its text still reaches the client.
        for index, delta in sorted(self._last_deltas.items()):
            message = _message_of(delta)
            yield sse_event(chat_chunk(self._meta, index, message,
                                       logprobs=self._logprobs(delta), usage=self._running()))
        self._last_deltas.clear()
        if self._include_usage:
            yield sse_event(usage_chunk(self._meta, "chat.completion.chunk", self._usage.final()))

    def _finish_chunk(self, finished: inference_pb2.GenerateFinished) -> dict[str, object]:
        """The choice's last chunk: its last delta's content (when tokens ended it, with what
        the engine's parsers still held) and the finish reason."""
        reason = finish_reason_name(finished.reason)
        last = self._last_deltas.pop(finished.index, None)
        message: dict[str, object] = {}
        logprobs = None
        if last is not None:
            message = _message_of(last)
            logprobs = self._logprobs(last)
        return chat_chunk(
            self._meta,
            finished.index,
            message,
            logprobs=logprobs,
            finish_reason=reason,
            stop_reason=stop_reason_of(finished),
            usage=self._running(),
        )

    def _logprobs(self, delta: inference_pb2.GenerateDelta) -> dict[str, object] | None:
        if not self._want_logprobs:
            return None
        return {"content": chat_logprob_entries(delta.logprobs)}

    def _running(self) -> dict[str, object] | None:
        return self._usage.current() if self._continuous_usage else None


def _message_of(delta: inference_pb2.GenerateDelta) -> dict[str, object]:
    """The chat delta for an engine delta: its parsed fields when the engine parsed the
    output, else its text."""
    if delta.HasField("parsed"):
        return delta_message(delta.parsed)
    return {"content": delta.text}
