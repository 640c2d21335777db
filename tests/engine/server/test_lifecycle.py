"""Lifecycle pieces without a model: GOAWAY options, the hang watchdog, drain waiting."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from engine.server.lifecycle import connection_age_options, wait_for_idle, watch_engine


def test_connection_age_options() -> None:
    assert connection_age_options(None) == []
    options = dict(connection_age_options(300))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] >= 30_000


class _FakeLoop:
    def __init__(self) -> None:
        self.error = None
        self.last_heartbeat = time.monotonic()
        self.num_streams = 0

    @property
    def is_alive(self) -> bool:
        return self.error is None

    def mark_dead(self, error: BaseException) -> None:
        self.error = error


def test_watchdog_declares_a_silent_step_thread_dead() -> None:
    loop = _FakeLoop()
    engine = SimpleNamespace(loop=loop)

    async def run() -> float:
        start = time.monotonic()
        await asyncio.wait_for(watch_engine(engine, hang_timeout_s=0.5), timeout=10)
        return time.monotonic() - start

    took = asyncio.run(run())
    assert loop.error is not None and "hung" in str(loop.error)
    assert took < 10


def test_wait_for_idle_times_out_then_succeeds() -> None:
    loop = _FakeLoop()
    loop.num_streams = 1
    engine = SimpleNamespace(loop=loop)
    assert asyncio.run(wait_for_idle(engine, 0.2)) is False
    loop.num_streams = 0
    assert asyncio.run(wait_for_idle(engine, 0.2)) is True
    assert asyncio.run(wait_for_idle(None, 0.2)) is True
