"""The slow-consumer bound of one server-streaming RPC: a stream whose client reads nothing
for `limit_s` is abandoned with SlowConsumerError.

Each write to the stream waits for HTTP/2 flow control, so a client that stops reading shows
up as one write that never returns. `asyncio.timeout` around every write would put a timer
(and a copy of the context) on the event loop's heap per message, and a cancelled timer stays
there until its time comes: one per token streamed, ~8 us each, and up to ~100 of them
parked in the heap. Here a write only notes when it began; one timer per stall period looks
at the write in progress when it fires and, if that write began less than `limit_s` ago,
re-arms for that write's own limit."""
from __future__ import annotations

import asyncio

import grpc

from engine.errors import SlowConsumerError


class StallGuard:
    """Writes one stream's messages; owned by the task that serves the RPC."""

    def __init__(self, context: grpc.aio.ServicerContext, limit_s: float) -> None:
        self._context = context
        self._limit_s = limit_s
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None, "a StallGuard lives in the task that serves the RPC"
        self._task = task
        self._write_began: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    async def write(self, message) -> None:
        began = self._loop.time()
        self._write_began = began
        if self._timer is None:
            self._timer = self._loop.call_at(began + self._limit_s, self._check)
        cancelling = self._task.cancelling()
        try:
            await self._context.write(message)
        except asyncio.CancelledError:
            # Ours when the timer expired this write and no one else cancelled the task too
            # (the same bookkeeping asyncio.timeout does); anything else propagates.
            if self._expired and self._task.uncancel() <= cancelling:
                raise SlowConsumerError(
                    f"the client read nothing for {self._limit_s:g} s") from None
            raise
        finally:
            self._write_began = None

    def close(self) -> None:
        """Drops the pending timer (the stream is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        began = self._write_began
        if began is None:
            return  # between writes: the next write arms a new timer
        due = began + self._limit_s
        if self._loop.time() >= due:
            self._expired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)
