"""Running the Generate calls of one OpenAI request: open them all, then merge or collect.

Invariant: every Generate call opened here is cancelled if its request ends early (an engine
error in a sibling call, a client disconnect, server shutdown); each call's generator is
closed on every exit path, and closing it cancels the call.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
from starlette.types import Receive

from protoserve.v1 import inference_pb2
from rest_bridge.engine_client import EngineClient
from rest_bridge.errors import BridgeError, bridge_error_from_rpc
from rest_bridge.translate.logprobs import with_token_id_labels
from rest_bridge.translate.proto_to_openai import PromptResult, collect_prompt_result
from rest_bridge.translate.request_to_proto import GenerationPlan

T = TypeVar("T")
EngineEvents = AsyncGenerator[inference_pb2.GenerateResponse, None]


@dataclass(frozen=True, slots=True)
class OpenStream:
    """A Generate call whose `started` event has been read; `events` yields the rest."""

    started: inference_pb2.GenerateStarted
    events: EngineEvents


@dataclass(frozen=True, slots=True)
class _MergedItem:
    """One message from a pump task to the merger: an event, a failure, or the end of a stream."""

    prompt_index: int
    event: inference_pb2.GenerateResponse | None = None
    error: BaseException | None = None


def translate_engine_error(
    error: BaseException, field_aliases: Mapping[str, str]
) -> BaseException:
    """Engine statuses become BridgeErrors; everything else passes through unchanged."""
    if isinstance(error, grpc.aio.AioRpcError):
        return bridge_error_from_rpc(error, field_aliases=dict(field_aliases))
    return error


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception that made a task group fail, skipping the cancellations it caused."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]


async def open_streams(
    client: EngineClient, plan: GenerationPlan, *, timeout: float | None
) -> list[OpenStream]:
    """Start every Generate call of `plan` concurrently and read each one's `started` event.

    Errors the engine answers before generating (bad values, unknown model) are raised here, so
    routes can still answer them as a plain HTTP error rather than inside a 200 stream.
    """
    generators: list[EngineEvents] = [
        client.generate(request, request_id=request.request_id, timeout=timeout)
        for request in plan.requests
    ]
    if plan.tokens_as_ids:
        generators = [with_token_id_labels(events) for events in generators]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_read_started(events)) for events in generators]
    except BaseExceptionGroup as group_error:
        await close_all(generators)
        raise translate_engine_error(first_error(group_error), plan.field_aliases) from None
    except BaseException:
        await close_all(generators)
        raise
    return [
        OpenStream(started=task.result(), events=events)
        for task, events in zip(tasks, generators, strict=True)
    ]


async def _read_started(events: EngineEvents) -> inference_pb2.GenerateStarted:
    first = await anext(events, None)
    if first is None or first.WhichOneof("event") != "started":
        raise BridgeError(
            "the engine stream did not begin with a started event", http_status=500
        )
    return first.started


async def close_all(generators: list[EngineEvents]) -> None:
    for events in generators:
        await events.aclose()


async def collect_results(
    streams: list[OpenStream], plan: GenerationPlan
) -> list[PromptResult]:
    """Gather every stream to completion, concurrently (a batch of prompts runs in parallel)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    collect_prompt_result(stream.started, stream.events, plan.choices_per_prompt)
                )
                for stream in streams
            ]
    except BaseExceptionGroup as group_error:
        raise translate_engine_error(first_error(group_error), plan.field_aliases) from None
    finally:
        await close_all([stream.events for stream in streams])
    return [task.result() for task in tasks]


async def merge_events(
    streams: list[OpenStream],
) -> AsyncGenerator[tuple[int, inference_pb2.GenerateResponse], None]:
    """Yield `(prompt_index, event)` from all streams in arrival order.

    Raises the first stream's error (untranslated); closing the merger cancels every call.
    """
    if len(streams) == 1:
        # The common case needs no tasks and no queue.
        try:
            async for event in streams[0].events:
                yield 0, event
        finally:
            await streams[0].events.aclose()
        return
    queue: asyncio.Queue[_MergedItem] = asyncio.Queue()
    pumps = [
        asyncio.create_task(_pump(index, stream.events, queue))
        for index, stream in enumerate(streams)
    ]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if item.error is not None:
                raise item.error
            if item.event is None:
                remaining -= 1
                continue
            yield item.prompt_index, item.event
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await close_all([stream.events for stream in streams])


async def _pump(index: int, events: EngineEvents, queue: asyncio.Queue[_MergedItem]) -> None:
    try:
        async for event in events:
            queue.put_nowait(_MergedItem(index, event=event))
    except Exception as error:
        queue.put_nowait(_MergedItem(index, error=error))
        return
    queue.put_nowait(_MergedItem(index))


class ClientDisconnected(BridgeError):
    def __init__(self) -> None:
        super().__init__("the client disconnected", http_status=499)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the HTTP client goes away.

    Only valid once the request body has been read: after that, the server's `receive` has
    nothing left to deliver except the disconnect.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(
    receive: Receive, work: Callable[[], Awaitable[T]]
) -> T:
    """Run `work`; if the client disconnects first, cancel it (which cancels its engine
    calls) and raise ClientDisconnected."""
    work_task: asyncio.Task[T] = asyncio.ensure_future(work())
    watcher = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)
    if work_task.cancelled():
        raise ClientDisconnected()
    return work_task.result()


async def open_streams_watched(
    receive: Receive, client: EngineClient, plan: GenerationPlan, *, timeout: float | None
) -> list[OpenStream]:
    """open_streams, abandoned (engine calls cancelled) if the HTTP client disconnects."""
    return await cancel_on_disconnect(receive, lambda: open_streams(client, plan, timeout=timeout))


async def collect_results_watched(
    receive: Receive, streams: list[OpenStream], plan: GenerationPlan
) -> list[PromptResult]:
    """collect_results for a non-streamed response: cancelled on disconnect, and every
    engine call closed whatever happens (also a cancellation before collection began)."""
    try:
        return await cancel_on_disconnect(receive, lambda: collect_results(streams, plan))
    finally:
        await close_all([stream.events for stream in streams])
