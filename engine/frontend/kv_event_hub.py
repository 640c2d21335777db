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
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine.core.loop import CoreCommand, SetKvEvents
from engine.errors import EngineError, SlowConsumerError
from engine.kv_cache.kv_events import KvEventBatch

# Batches (engine steps) a watcher may fall behind before it is cut off: at tens of steps a
# second, tens of seconds of slack.
DEFAULT_MAX_PENDING_BATCHES = 1024


class WatcherOverflow(SlowConsumerError):
    """The watcher fell more than its queue bound behind and was cut off."""

    def __init__(self, max_pending: int) -> None:
        super().__init__(
            f"the KV-event watcher fell more than {max_pending} batches behind and was cut "
            "off; reconnect and treat this replica's cache as unknown"
        )


class KvEventWatcher:
    """One open stream's view: its pending batches, then the end of the stream."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        # Unbounded queue with our own bound: the end marker (an error) must always fit.
        self._queue: asyncio.Queue[KvEventBatch | EngineError] = asyncio.Queue()
        self._pending = 0
        self.cut_off = False

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

    @property
    def num_watchers(self) -> int:
        return len(self._watchers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the watchers live on (EngineLoop.start)."""
        self._loop = loop

    def subscribe(self, max_pending: int | None = None) -> KvEventWatcher:
        """Called on the event loop. `max_pending`: this watcher's bound (default: the
        hub's)."""
        watcher = KvEventWatcher(max_pending or self.max_pending)
        self._watchers.add(watcher)
        if len(self._watchers) == 1:
            self._send(SetKvEvents(True))
        return watcher

    def unsubscribe(self, watcher: KvEventWatcher) -> None:
        """Called on the event loop; idempotent (a cut-off watcher is already gone)."""
        if watcher in self._watchers:
            self._watchers.discard(watcher)
            if not self._watchers:
                self._send(SetKvEvents(False))

    def publish(self, batch: KvEventBatch) -> None:
        """From the core's thread (step thread or reader thread): hop to the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fan_out, batch)

    def _fan_out(self, batch: KvEventBatch) -> None:
        for watcher in list(self._watchers):
            if not watcher._offer(batch):
                self.unsubscribe(watcher)

    def fail(self, error: EngineError) -> None:
        """The engine stopped: every stream ends with `error` (on the event loop)."""
        for watcher in list(self._watchers):
            watcher._end(error)
        self._watchers.clear()
