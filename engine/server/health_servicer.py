"""grpc.health.v1 with `List`: grpcio-health-checking's asyncio servicer implements Check and
Watch only (its List raises UNIMPLEMENTED), and meshes and operators use List to see every
service's status at once."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # _server_status is the parent's only state; a snapshot, so a concurrent set() is safe.
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status)
                      for name, status in statuses.items()}
        )
