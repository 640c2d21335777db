"""`GET /v1/kv_events`: the engine's KV-cache events (Discovery/WatchKvEvents) as server-sent
events, for cache-aware routers that speak HTTP.

    : watching                       a comment, once recording is on: every request sent
                                     after it has its blocks announced
    id: 7                            the sequence number, which an SSE client sends back as
                                     Last-Event-ID when it reconnects
    data: {"sequence_number": 7, "timestamp": 1765130000.5, "events": [
            {"type": "block_stored", "block_hashes": ["<32 hex digits>", ...],
             "parent_block_hash": "<hex>" | null, "token_ids": [...], "block_size": 16,
             "lora_name": null},
            {"type": "block_removed", "block_hashes": [...]},
            {"type": "all_blocks_cleared"}]}

One data event per engine step that changed the cache; field names follow vLLM's KV events,
hashes are hex (protoserve/kv_block_hashes.py computes them). Reconnecting with
`Last-Event-ID: N` (what EventSource clients send) or `?since_sequence_number=N+1` replays the
batches after N first (Discovery/WatchKvEvents' since_sequence_number); when they are gone,
HTTP 400 with code KV_EVENTS_REPLAY_UNAVAILABLE: reconnect without either and resync. The stream has no end; when the
engine ends it (a watcher too slow to keep up, the engine stopping) a last
`data: {"error": {...}}` event says why. Errors before the stream starts are plain HTTP errors
in the OpenAI envelope.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc
from fastapi import APIRouter, Header, Request

from protoserve.v1 import discovery_pb2
from rest_bridge.errors import bridge_error_from_rpc, invalid_request
from rest_bridge.routes.route_context import RouteContext
from rest_bridge.sse import SSEResponse, sse_event

router = APIRouter()

_WATCHING = b": watching\n\n"


# Not in /openapi.json: an endless stream is no operation a client generator or a schema
# fuzzer can call and wait on (as /metrics, it is for infrastructure).
@router.get("/v1/kv_events", response_class=SSEResponse, include_in_schema=False)
async def kv_events(
    request: Request, model: str = "", since_sequence_number: int | None = None,
    last_event_id: str | None = Header(default=None),
) -> SSEResponse:
    since = since_sequence_number
    if since is None and last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise invalid_request(f"Last-Event-ID must be a batch's sequence number, got "
                                  f"{last_event_id!r}", param="Last-Event-ID")
        since = int(last_event_id) + 1  # the last batch the client has: replay after it
    if since is not None and since < 0:
        raise invalid_request(f"since_sequence_number must be >= 0, got {since}",
                              param="since_sequence_number")
    call = RouteContext.of(request).client.watch_kv_events(model, since)
    try:
        await call.initial_metadata()
        if call.done():  # refused before the stream began: an HTTP error, not a 200
            await call.read()  # raises the call's error
    except grpc.aio.AioRpcError as error:
        raise bridge_error_from_rpc(error) from None
    return SSEResponse(_relay(call))


async def _relay(call: grpc.aio.UnaryStreamCall) -> AsyncGenerator[bytes, None]:
    try:
        yield _WATCHING
        async for batch in call:
            yield b"id: %d\n" % batch.sequence_number + sse_event(batch_to_json(batch))
    except grpc.aio.AioRpcError as error:
        yield sse_event(bridge_error_from_rpc(error).envelope())
    finally:
        call.cancel()


def batch_to_json(batch: discovery_pb2.WatchKvEventsResponse) -> dict[str, Any]:
    return {
        "sequence_number": batch.sequence_number,
        "timestamp": batch.timestamp,
        "events": [_event_to_json(event) for event in batch.events],
    }


def _event_to_json(event: discovery_pb2.KvEvent) -> dict[str, Any]:
    kind = event.WhichOneof("event")
    if kind == "block_stored":
        stored = event.block_stored
        return {
            "type": kind,
            "block_hashes": [h.hex() for h in stored.block_hashes],
            "parent_block_hash": (
                stored.parent_block_hash.hex() if stored.HasField("parent_block_hash") else None),
            "token_ids": list(stored.token_ids),
            "block_size": stored.block_size,
            "lora_name": stored.lora_name or None,
        }
    if kind == "block_removed":
        return {"type": kind, "block_hashes": [h.hex() for h in event.block_removed.block_hashes]}
    return {"type": "all_blocks_cleared"}
