"""Fan-out of the core's KV-event batches to Discovery/WatchKvEvents streams.

    core (step thread or process) --KvEventBatch per step--> publish() --call_soon--> each
    watcher's bounded asyncio queue --> its gRPC stream

Recording in the core costs something on every cache change, so it is on only while at
least one watcher is connected: the first subscribe sends SetKvEvents(True) to the core, the
last unsubscribe SetKvEvents(False). Commands reach the core in order, so every request sent
after subscribe() returned has its blocks announced to that watcher.

A watcher that does not read (a stalled router) never slows the engine: its queue holds at
most `max_pending` batches; one more and it is cut off (its stream ends with
RESOURCE_EXHAUSTED after the batches it already has), since a router that missed events no
longer knows what each replica caches and must start over.

Replay: the hub keeps the last `--kv-events-replay-batches` batches in a ring, so a router
that reconnects (after a network blip, or after being cut off) with `since_sequence_number`
= the number after the last one it read gets what it missed, then the live feed. After the
last watcher leaves, recording stays on until the ring has turned over once (past that no
reconnect could be served anyway), then goes off. A number the ring no longer holds, one from
before recording went off, or one the server has not reached (it restarted and counts from 0
again) is refused with FAILED_PRECONDITION (reason KV_EVENTS_REPLAY_UNAVAILABLE, field
since_sequence_number): the router must resync, i.e. reconnect without a number and treat the
replica's cache as unknown (Admin/ResetPrefixCache empties it, announced as
AllBlocksCleared). The core skips one sequence number whenever recording comes back on
(engine.kv_cache.kv_events), so the hub sees where events were not recorded.
"""
from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from engine.core.loop import CoreCommand, SetKvEvents
from engine.errors import EngineError, FailedPreconditionError, SlowConsumerError
from engine.kv_cache.kv_events import KvEventBatch

# Batches (engine steps) a watcher may fall behind before it is cut off: at tens of steps a
# second, tens of seconds of slack.
DEFAULT_MAX_PENDING_BATCHES = 1024
# Batches kept for watchers that reconnect (`--kv-events-replay-batches`).
DEFAULT_REPLAY_BATCHES = 1024


class WatcherOverflow(SlowConsumerError):
    """The watcher fell more than its queue bound behind and was cut off."""

    def __init__(self, max_pending: int) -> None:
        super().__init__(
            f"the KV-event watcher fell more than {max_pending} batches behind and was cut "
            "off; reconnect with since_sequence_number to replay what it missed, or without "
            "and treat this replica's cache as unknown"
        )


class ReplayUnavailable(FailedPreconditionError):
    """A reconnect asked for batches the hub no longer holds (or never had)."""

    reason = "KV_EVENTS_REPLAY_UNAVAILABLE"

    def __init__(self, since: int, why: str) -> None:
        super().__init__(
            f"since_sequence_number {since}: {why}; resync: reconnect without "
            "since_sequence_number and treat this replica's cache as unknown",
            field="since_sequence_number")


class KvEventWatcher:
    """One open stream's view: its pending batches, then the end of the stream."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        # Unbounded queue with our own bound: the end marker (an error) must always fit.
        self._queue: asyncio.Queue[KvEventBatch | EngineError] = asyncio.Queue()
        self._pending = 0
        # Replayed batches at the head of the queue: they do not count against max_pending.
        self._replayed = 0
        self.cut_off = False

    def _replay(self, batches: list[KvEventBatch]) -> None:
        self._replayed += len(batches)
        for batch in batches:
            self._queue.put_nowait(batch)

    def _offer(self, batch: KvEventBatch) -> bool:
        """Queue a batch; False when this watcher has just been cut off."""
        if self._pending >= self.max_pending:
            self._end(WatcherOverflow(self.max_pending))
            return False
        self._pending += 1
        self._queue.put_nowait(batch)
        return True

    def _end(self, error: EngineError) -> None:
        self.cut_off = True
        self._queue.put_nowait(error)

    async def next_batch(self) -> KvEventBatch:
        """The next batch; raises WatcherOverflow (or the engine's failure) once the
        batches queued before the end are read."""
        item = await self._queue.get()
        if isinstance(item, EngineError):
            raise item
        if self._replayed:
            self._replayed -= 1
        else:
            self._pending -= 1
        return item


class KvEventHub:
    def __init__(
        self, send: Callable[[CoreCommand], None], max_pending: int = DEFAULT_MAX_PENDING_BATCHES
    ) -> None:
        self._send = send
        self.max_pending = max_pending
        self._watchers: set[KvEventWatcher] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # The last batches, for reconnects; consecutive numbers (cleared at a gap).
        self._ring: deque[KvEventBatch] = deque(maxlen=0)
        self._recording = False
        # The number the next batch should carry, and the smallest since_sequence_number a
        # reconnect may give (infinite while recording is off: events go unrecorded).
        self._next = 0
        self._first_resumable: float = 0
        # Batches still to record after the last watcher left (the ring turning over).
        self._linger_left = 0

    def keep_for_replay(self, batches: int) -> None:
        """Hold the last `batches` batches for reconnects (0: no replay)."""
        if batches != self._ring.maxlen:
            self._ring = deque(self._ring, maxlen=batches)

    @property
    def num_watchers(self) -> int:
        return len(self._watchers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the watchers live on (EngineLoop.start)."""
        self._loop = loop

    def subscribe(self, max_pending: int | None = None, since: int | None = None) -> (
            KvEventWatcher):
        """Called on the event loop. `max_pending`: this watcher's bound (default: the
        hub's). `since`: replay the batches numbered from it on first (ReplayUnavailable
        when they are not all here)."""
        replay = [] if since is None else self._replay_since(since)
        watcher = KvEventWatcher(max_pending or self.max_pending)
        watcher._replay(replay)
        self._watchers.add(watcher)
        self._linger_left = 0
        if not self._recording:
            self._recording = True
            self._send(SetKvEvents(True))
        return watcher

    def _replay_since(self, since: int) -> list[KvEventBatch]:
        if since > self._next:
            raise ReplayUnavailable(since, f"this server's next batch is {self._next} (a "
                                    "restarted server counts from 0 again)")
        oldest = self._ring[0].sequence_number if self._ring else self._next
        if math.isinf(self._first_resumable):
            raise ReplayUnavailable(since, "events after it went unrecorded (nobody watched)")
        first = max(oldest, int(self._first_resumable))
        if since < first:
            raise ReplayUnavailable(since, "those batches are no longer held (the oldest that "
                                    f"can be replayed is {first})")
        return [batch for batch in self._ring if batch.sequence_number >= since]

    def unsubscribe(self, watcher: KvEventWatcher) -> None:
        """Called on the event loop; idempotent (a cut-off watcher is already gone)."""
        if watcher in self._watchers:
            self._watchers.discard(watcher)
            if not self._watchers:
                # Keep recording while a reconnect could still be replayed to.
                self._linger_left = self._ring.maxlen or 0
                if not self._linger_left:
                    self._stop_recording()

    def _stop_recording(self) -> None:
        self._recording = False
        self._first_resumable = math.inf
        self._ring.clear()
        self._send(SetKvEvents(False))

    def publish(self, batch: KvEventBatch) -> None:
        """From the core's thread (step thread or reader thread): hop to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fan_out, batch)

    def _fan_out(self, batch: KvEventBatch) -> None:
        if batch.sequence_number != self._next:  # recording came back on after a pause
            self._ring.clear()
            self._first_resumable = batch.sequence_number
        self._next = batch.sequence_number + 1
        self._ring.append(batch)
        for watcher in list(self._watchers):
            if not watcher._offer(batch):
                self.unsubscribe(watcher)
        if self._recording and not self._watchers and self._linger_left:
            self._linger_left -= 1
            if not self._linger_left:
                self._stop_recording()

    def fail(self, error: EngineError) -> None:
        """The engine stopped: every stream ends with `error` (on the event loop)."""
        for watcher in list(self._watchers):
            watcher._end(error)
        self._watchers.clear()
