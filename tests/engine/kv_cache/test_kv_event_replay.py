"""Replay of KV-event batches to a watcher that reconnects with since_sequence_number: what
it missed from the ring, then the live feed; recording kept on after the last watcher until
the ring has turned over; refusals (fallen out of the ring, unrecorded, past the server's
count) naming the field. The batches come from a real recorder (cache manager and pool)."""
from __future__ import annotations

import asyncio

import pytest

from engine.core.loop import SetKvEvents
from engine.frontend.kv_event_hub import KvEventHub, KvEventWatcher, ReplayUnavailable
from engine.kv_cache import KVCacheManager
from engine.kv_cache.kv_events import AllBlocksCleared, KvEventRecorder


class Engine:
    """The core's side: a real recorder, switched by the hub's commands, whose batches the
    hub receives in order (as from the step thread)."""

    def __init__(self, replay: int, max_pending: int = 8) -> None:
        self.kv = KVCacheManager(8, 4)
        self.sent: list[SetKvEvents] = []
        self.hub = KvEventHub(self._command, max_pending=max_pending)
        self.hub.keep_for_replay(replay)
        self.hub.bind(asyncio.get_running_loop())

    @property
    def recorder(self) -> KvEventRecorder:
        return self.kv.pool.events

    def _command(self, command: SetKvEvents) -> None:
        self.sent.append(command)
        self.recorder.set_enabled(command.enabled)

    async def step(self) -> int | None:
        """One step that changes the cache; the number of its batch (None: not recorded)."""
        self.kv.pool.reset_prefix_cache()
        batch = self.recorder.take_batch() if self.recorder.enabled else None
        if batch is not None:
            self.hub.publish(batch)
        await asyncio.sleep(0)  # the hop to the event loop
        return None if batch is None else batch.sequence_number


async def numbers(watcher: KvEventWatcher, count: int) -> list[int]:
    return [(await watcher.next_batch()).sequence_number for _ in range(count)]


def test_a_reconnect_gets_what_it_missed_then_the_live_feed() -> None:
    async def run() -> None:
        engine = Engine(replay=16)
        watcher = engine.hub.subscribe()
        assert [await engine.step() for _ in range(3)] == [0, 1, 2]
        assert await numbers(watcher, 3) == [0, 1, 2]
        engine.hub.unsubscribe(watcher)
        # Nobody watches, but recording stays on: a reconnect may come.
        assert [await engine.step() for _ in range(2)] == [3, 4]
        assert engine.sent == [SetKvEvents(True)]
        again = engine.hub.subscribe(since=3)
        assert await engine.step() == 5
        assert await numbers(again, 3) == [3, 4, 5]
        # Nothing missed: since = the next number is a plain reconnect.
        other = engine.hub.subscribe(since=6)
        assert await engine.step() == 6
        assert await numbers(other, 1) == [6]
        assert (await again.next_batch()).events == (AllBlocksCleared(),)

    asyncio.run(run())


def test_batches_that_left_the_ring_or_were_never_reached_are_refused() -> None:
    async def run() -> None:
        engine = Engine(replay=3)
        watcher = engine.hub.subscribe()
        for _ in range(5):
            await engine.step()
        await numbers(watcher, 5)
        with pytest.raises(ReplayUnavailable) as gone:
            engine.hub.subscribe(since=1)
        assert gone.value.kind.name == "FAILED_PRECONDITION"
        assert gone.value.field == "since_sequence_number"
        assert "oldest that can be replayed is 2" in gone.value.message
        with pytest.raises(ReplayUnavailable, match="next batch is 5"):
            engine.hub.subscribe(since=9)  # a restarted server's count
        assert engine.hub.num_watchers == 1  # refusals register nothing
        assert await numbers(engine.hub.subscribe(since=2), 3) == [2, 3, 4]

    asyncio.run(run())


def test_recording_stops_once_the_ring_turned_over_and_resumes_with_a_gap() -> None:
    async def run() -> None:
        engine = Engine(replay=2)
        watcher = engine.hub.subscribe()
        assert await engine.step() == 0
        await numbers(watcher, 1)
        engine.hub.unsubscribe(watcher)
        assert [await engine.step() for _ in range(3)] == [1, 2, None]
        assert engine.sent == [SetKvEvents(True), SetKvEvents(False)]
        # Step 3's reset went unrecorded: every number is refused until a fresh batch.
        for since in (1, 3):
            with pytest.raises(ReplayUnavailable, match="unrecorded"):
                engine.hub.subscribe(since=since)
        fresh = engine.hub.subscribe()
        # The recorder skipped a number where it resumed; the hub starts its ring there.
        assert await engine.step() == 4
        assert await numbers(fresh, 1) == [4]
        with pytest.raises(ReplayUnavailable, match="oldest that can be replayed is 4"):
            engine.hub.subscribe(since=3)
        assert await numbers(engine.hub.subscribe(since=4), 1) == [4]

    asyncio.run(run())


def test_replayed_batches_do_not_count_against_the_bound() -> None:
    async def run() -> None:
        engine = Engine(replay=16, max_pending=2)
        first = engine.hub.subscribe()
        for _ in range(2):
            await engine.step()
        await numbers(first, 2)
        for _ in range(6):  # 2..7 while `first` keeps up
            await engine.step()
            await numbers(first, 1)
        late = engine.hub.subscribe(since=0)  # 8 replayed, more than the bound of 2
        await engine.step()
        assert await numbers(late, 9) == list(range(9))
        assert not late.cut_off

    asyncio.run(run())


def test_no_replay_keeps_the_old_switch() -> None:
    async def run() -> None:
        engine = Engine(replay=0)
        watcher = engine.hub.subscribe()
        engine.hub.unsubscribe(watcher)
        assert engine.sent == [SetKvEvents(True), SetKvEvents(False)]

    asyncio.run(run())


def test_the_recorder_skips_a_number_only_when_resuming() -> None:
    recorder = KvEventRecorder()
    recorder.set_enabled(True)
    recorder.cleared()
    first = recorder.take_batch()
    assert first is not None and first.sequence_number == 0
    recorder.set_enabled(True)  # already on: no skip
    recorder.cleared()
    second = recorder.take_batch()
    assert second is not None and second.sequence_number == 1
    recorder.set_enabled(False)
    recorder.set_enabled(True)
    recorder.cleared()
    third = recorder.take_batch()
    assert third is not None and third.sequence_number == 3
