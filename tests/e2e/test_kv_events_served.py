"""KV-cache events of a running engine-serve (engine core in its own process), read the way a
router reads them: over a real gRPC stream (Discovery/WatchKvEvents) and the bridge's SSE
route (GET /v1/kv_events). The block hashes are checked against protoserve.kv_block_hashes,
the function a router runs on a prompt's token ids without the engine.

The server has a tiny cache (block size 4, 12 blocks) so that a few prompts evict the first.
"""
from __future__ import annotations

import json
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from engine_process import EngineProcess, start_engine
from example_scripts import load_picker
from protoserve.kv_block_hashes import block_hashes
from protoserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

BLOCK_SIZE = 4
MAX_PENDING = 16  # batches a watcher may fall behind
WAIT_S = 120.0


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    # Its own server: the test resets the prefix cache and fills the pool.
    handle = start_engine(tiny_llama_dir, "--block-size", str(BLOCK_SIZE), "--num-kv-blocks",
                          "12", "--kv-events-max-pending", str(MAX_PENDING), role="all")
    try:
        yield handle
    finally:
        handle.stop()


def prompt(first: int, length: int = 13) -> list[int]:
    return list(range(first, first + length))


def generate(address: str, token_ids: list[int], max_tokens: int = 1,
             cache_salt: str = "") -> list[int]:
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=token_ids), return_text=False, cache_salt=cache_salt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True))
    tokens: list[int] = []
    with grpc.insecure_channel(address) as channel:
        for event in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=WAIT_S):
            if event.HasField("delta"):
                tokens.extend(event.delta.token_ids)
    return tokens


class Watcher:
    """A WatchKvEvents stream read on a thread into a queue, as a router would."""

    def __init__(self, address: str, since: int | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = discovery_pb2_grpc.DiscoveryStub(self.channel).WatchKvEvents(
            discovery_pb2.WatchKvEventsRequest(since_sequence_number=since))
        self.call.initial_metadata()  # recording is on: later requests are announced
        self.batches: queue.Queue[discovery_pb2.WatchKvEventsResponse] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for batch in self.call:
                self.batches.put(batch)
        except grpc.RpcError:
            pass  # cancelled by close()

    def until(self, found, what: str) -> list[discovery_pb2.WatchKvEventsResponse]:
        """Batches read until `found(events so far)` holds."""
        seen: list[discovery_pb2.WatchKvEventsResponse] = []
        deadline = time.monotonic() + WAIT_S
        while not found([e for b in seen for e in b.events]):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} in {seen}"
            seen.append(self.batches.get(timeout=remaining))
        return seen

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


def stored_hashes(events) -> list[bytes]:
    return [h for e in events if e.HasField("block_stored") for h in e.block_stored.block_hashes]


def removed_hashes(events) -> set[bytes]:
    return {h for e in events if e.HasField("block_removed") for h in e.block_removed.block_hashes}


def test_grpc_stream_announces_stored_removed_and_cleared_blocks(server: EngineProcess) -> None:
    watcher = Watcher(server.grpc_address)
    try:
        first = prompt(20)
        generate(server.grpc_address, first, cache_salt="tenant-a")
        expected = block_hashes(first, BLOCK_SIZE, "tenant-a")
        assert len(expected) == 3
        batches = watcher.until(lambda ev: set(expected) <= set(stored_hashes(ev)),
                                "BlockStored of the first prompt")
        stored = next(e.block_stored for b in batches for e in b.events
                      if e.HasField("block_stored") and expected[0] in e.block_stored.block_hashes)
        assert list(stored.block_hashes) == expected
        assert not stored.HasField("parent_block_hash")  # block 0 of the prompt
        assert list(stored.token_ids) == first[:12] and stored.block_size == BLOCK_SIZE

        # Other prompts need the pool's 12 blocks: the first prompt's blocks are reused.
        for n in range(6):
            generate(server.grpc_address, prompt(100 + 20 * n))
        batches += watcher.until(lambda ev: set(expected) <= removed_hashes(ev),
                                 "BlockRemoved of the first prompt")

        with grpc.insecure_channel(server.grpc_address) as channel:
            admin_pb2_grpc.AdminStub(channel).ResetPrefixCache(
                admin_pb2.ResetPrefixCacheRequest(), timeout=WAIT_S)
        batches += watcher.until(
            lambda ev: any(e.HasField("all_blocks_cleared") for e in ev), "AllBlocksCleared")
        numbers = [b.sequence_number for b in batches]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert all(b.timestamp > 0 for b in batches)
    finally:
        watcher.close()


def test_sse_route_relays_the_events(server: EngineProcess) -> None:
    assert server.http_url is not None
    token_ids = prompt(300, 9)
    with httpx.Client(base_url=server.http_url, timeout=WAIT_S) as client:
        with client.stream("GET", "/v1/kv_events") as events:
            assert events.status_code == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            lines = events.iter_lines()
            assert next(lines) == ": watching"
            model = client.get("/v1/models").json()["data"][0]["id"]
            answer = client.post("/v1/completions", json={
                "model": model, "prompt": token_ids, "max_tokens": 1, "temperature": 0.0})
            assert answer.status_code == 200, answer.text
            expected = [h.hex() for h in block_hashes(token_ids, BLOCK_SIZE)]
            stored: list[str] = []
            for line in lines:
                if not line.startswith("data: "):
                    continue
                batch = json.loads(line[len("data: "):])
                assert isinstance(batch["sequence_number"], int)
                for event in batch["events"]:
                    if event["type"] == "block_stored" and event["block_hashes"][0] in expected:
                        stored = event["block_hashes"]
                        assert event["token_ids"] == token_ids[:8]
                        assert event["parent_block_hash"] is None
                        assert event["block_size"] == BLOCK_SIZE
                if stored:
                    break
            assert stored == expected


def test_a_watcher_that_does_not_read_neither_stalls_generation_nor_stays(
        server: EngineProcess) -> None:
    # Opened and never read, with a small receive window so the server's sends back up.
    stalled = Watcher.__new__(Watcher)
    stalled.channel = grpc.insecure_channel(server.grpc_address, options=[
        ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
    stalled.call = discovery_pb2_grpc.DiscoveryStub(stalled.channel).WatchKvEvents(
        discovery_pb2.WatchKvEventsRequest())
    stalled.call.initial_metadata()
    reader = Watcher(server.grpc_address)
    try:
        # Each request stores its prompt's blocks, then a decode block, and evicts others':
        # a few batches each, several times the bound and the window together.
        num_requests = 2 * MAX_PENDING
        for n in range(num_requests):
            # A first token of its own: chained hashes make every block new.
            tokens = generate(server.grpc_address, [10 + n, *prompt(100, 39)], max_tokens=4)
            assert len(tokens) == 4
        # The reading watcher kept its feed.
        reader.until(lambda ev: len(stored_hashes(ev)) >= 10 * num_requests,
                     "the requests' blocks")
        # The silent one was cut off: after what was queued, RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stalled.call:
                pass
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"fell more than {MAX_PENDING} batches behind" in ended.value.details()
    finally:
        stalled.close()
        reader.close()


def test_a_reconnect_replays_what_it_missed_over_grpc_and_sse(server: EngineProcess) -> None:
    first, missed = prompt(400), prompt(440)
    expected_first = block_hashes(first, BLOCK_SIZE, "replay")
    expected_missed = block_hashes(missed, BLOCK_SIZE, "replay")
    watcher = Watcher(server.grpc_address)
    try:
        generate(server.grpc_address, first, cache_salt="replay")
        seen = watcher.until(lambda ev: set(expected_first) <= set(stored_hashes(ev)),
                             "BlockStored of the first prompt")
    finally:
        watcher.close()
    last = seen[-1].sequence_number
    # Generated while nobody watches: the router would have missed it.
    generate(server.grpc_address, missed, cache_salt="replay")
    again = Watcher(server.grpc_address, since=last + 1)
    try:
        replayed = again.until(lambda ev: set(expected_missed) <= set(stored_hashes(ev)),
                               "BlockStored of the prompt generated while disconnected")
    finally:
        again.close()
    numbers = [b.sequence_number for b in replayed]
    assert numbers == list(range(last + 1, last + 1 + len(numbers)))

    # An SSE client reconnects with the last id it read.
    assert server.http_url is not None
    with httpx.Client(base_url=server.http_url, timeout=WAIT_S) as client:
        with client.stream("GET", "/v1/kv_events",
                           headers={"Last-Event-ID": str(last)}) as events:
            assert events.status_code == 200
            lines = (line for line in events.iter_lines() if line)
            assert next(lines) == ": watching"
            assert next(lines) == f"id: {last + 1}"
            stored: set[str] = set()
            for line in lines:
                if line.startswith("data: "):
                    batch = json.loads(line[len("data: "):])
                    stored |= {h for e in batch["events"] if e["type"] == "block_stored"
                               for h in e["block_hashes"]}
                if {h.hex() for h in expected_missed} <= stored:
                    break
        bad = client.get("/v1/kv_events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
        ahead = client.get("/v1/kv_events", params={"since_sequence_number": last + 10**6})
        assert ahead.status_code == 400
        assert ahead.json()["error"]["code"] == "KV_EVENTS_REPLAY_UNAVAILABLE"
        assert ahead.json()["error"]["param"] == "since_sequence_number"


def test_a_reconnect_past_the_servers_count_must_resync(server: EngineProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = discovery_pb2_grpc.DiscoveryStub(channel).WatchKvEvents(
            discovery_pb2.WatchKvEventsRequest(since_sequence_number=10**9), timeout=WAIT_S)
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "since_sequence_number 1000000000" in refused.value.details()
    assert "resync" in refused.value.details()
    reasons = [value for key, value in refused.value.trailing_metadata()
               if key == "grpc-status-details-bin"]
    assert reasons and b"KV_EVENTS_REPLAY_UNAVAILABLE" in reasons[0]


def test_an_unknown_model_is_refused_naming_the_field(server: EngineProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = discovery_pb2_grpc.DiscoveryStub(channel).WatchKvEvents(
            discovery_pb2.WatchKvEventsRequest(model="nope"), timeout=WAIT_S)
        with pytest.raises(grpc.RpcError) as refused:
            next(call)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in refused.value.details()
    assert server.http_url is not None
    answer = httpx.get(f"{server.http_url}/v1/kv_events", params={"model": "nope"},
                       timeout=WAIT_S)
    assert answer.status_code == 404
    assert answer.json()["error"]["param"] == "model"


def test_the_example_load_picker_reads_a_real_replica(server: EngineProcess) -> None:
    # examples/router/load_picker.py, as the compose example runs it, polling this server.
    picker = load_picker()
    poller = picker.LoadPoller([server.grpc_address], interval_s=0.2, timeout_s=WAIT_S)
    poller.poll_once()
    assert picker.pick(poller.loads) == server.grpc_address
    (replica,) = poller.loads
    assert replica.load.num_kv_blocks == 12


def test_a_stopping_server_ends_watch_streams_with_unavailable(tiny_llama_dir: Path) -> None:
    handle = start_engine(tiny_llama_dir)
    try:
        with grpc.insecure_channel(handle.grpc_address) as channel:
            call = discovery_pb2_grpc.DiscoveryStub(channel).WatchKvEvents(
                discovery_pb2.WatchKvEventsRequest(), timeout=WAIT_S)
            call.initial_metadata()
            handle.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in ended.value.details()
    finally:
        handle.stop()
