"""grpc.health.v1 with `List`: grpcio-health-checking's asyncio servicer implements Check and
Watch only (its List raises UNIMPLEMENTED), and meshes and operators use List to see every
service's status at once.

Watch streams end when the server stops. The library's Watch runs until its client leaves;
a server stopping under an open one cancels it after the grace period, and grpc logs that
cancellation as an unhandled error with two tracebacks, at every shutdown a probe watches."""
from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health, health_pb2

# After the stop's NOT_SERVING is published: time for a watcher to be sent it.
_FINAL_STATUS_S = 0.1


class HealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # _server_status is the parent's only state; a snapshot, so a concurrent set() is safe.
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status)
                      for name, status in statuses.items()}
        )

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good; then every Watch stream ends (status OK)."""
        await super().enter_graceful_shutdown()
        self._closing.set()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not watch.done():
                await asyncio.wait({watch}, timeout=_FINAL_STATUS_S)
        finally:
            closing.cancel()
            if not watch.done():
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
        if not watch.cancelled():
            watch.result()
