"""Builds and runs the engine's gRPC server: the protoserve.v1 services, grpc.health.v1 and
server reflection, on TCP and (for a co-located bridge) a Unix domain socket.

Health: "" is liveness (SERVING while the process runs, NOT_SERVING once engine-serve is
going down because a child died); "protoserve.v1.Inference" is readiness: SERVING once
weights are loaded and warmed up, NOT_SERVING while loading, after the step thread dies, and
while draining. Both turn NOT_SERVING when the server stops, and Watch streams then end.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.config import EngineConfig
from engine.errors import EngineUnavailableError
from engine.frontend.served_model import Engine
from engine.server.context import EngineHandle
from engine.server.health_servicer import HealthServicer
from engine.server.inference_servicer import InferenceServicer
from engine.server.info_servicers import AdminServicer, DiscoveryServicer, TokenizerServicer
from engine.server.interceptors import UndecodableRequestInterceptor
from engine.server.lifecycle import connection_age_options, wait_for_idle, watch_engine
from engine.server.security import ApiKeyInterceptor, GrpcTls
from protoserve.listeners import ListenError, check_tcp, check_unix, tcp_address
from protoserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

READINESS_SERVICE = "protoserve.v1.Inference"
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GrpcServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    # Extra listening address for a co-located bridge, e.g. "unix:/tmp/protoserve.sock".
    uds_address: str | None = None
    # Bearer key required on every call except to `auth_exempt_services` (health, reflection).
    api_key: str | None = None
    auth_exempt_services: tuple[str, ...] = ()
    # Required on Admin (which the client key never opens); also accepted where api_key is.
    admin_api_key: str | None = None
    # TLS (and mTLS) for the TCP port; the local UDS stays plaintext.
    tls: GrpcTls | None = None
    # Connections get GOAWAY after this long, so long-lived HTTP/2 clients rebalance across
    # replicas behind a load balancer; None keeps them forever.
    max_connection_age_s: float | None = None
    # No step-thread heartbeat for this long = hung: readiness NOT_SERVING, streams fail.
    engine_hang_timeout_s: float = 60.0


class EngineServer:
    def __init__(self, config: EngineConfig, server_config: GrpcServerConfig) -> None:
        self.config = config
        self.server_config = server_config
        self.handle = EngineHandle()
        self.health = HealthServicer()  # the library's, plus List
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if server_config.api_key or server_config.admin_api_key:
            # First, so an unauthenticated call is refused before any other work.
            interceptors.append(ApiKeyInterceptor(
                server_config.api_key or None, server_config.auth_exempt_services,
                admin_key=server_config.admin_api_key or None))
        interceptors.append(UndecodableRequestInterceptor())
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # grpc shares a port with any other process that asks (SO_REUSEPORT): a second
                # engine on a taken port would start and get half its connections.
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                *connection_age_options(server_config.max_connection_age_s),
            ]
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.handle), self.server)
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(self.handle), self.server)
        discovery_pb2_grpc.add_DiscoveryServicer_to_server(DiscoveryServicer(self.handle), self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.handle), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name,
            discovery_pb2.DESCRIPTOR.services_by_name["Discovery"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(service_names, self.server)
        self._watchdog: asyncio.Task | None = None
        self.port = server_config.port  # the bound one once started (port 0: the kernel's)

    async def start(self) -> None:
        """Bind and serve; raises ListenError (naming the flag) for an address it cannot take."""
        host, port = self.server_config.host, self.server_config.port
        uds = self.server_config.uds_address
        # Probed first: grpc's own failure names no reason, and over a live Unix socket it
        # would silently unlink the other server's socket and take the path.
        check_tcp(host, port, "--grpc-port")
        if uds:
            check_unix(uds.removeprefix("unix:"), "--grpc-uds")
        address = tcp_address(host, port)
        tls = self.server_config.tls
        try:
            if tls is not None:
                self.port = self.server.add_secure_port(address, tls.server_credentials())
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # taken between the probe and the bind
            raise ListenError(address, "--grpc-port", "grpc could not bind it") from None
        if uds:
            try:
                self.server.add_insecure_port(uds)
            except RuntimeError:
                raise ListenError(uds, "--grpc-uds", "grpc could not bind it") from None
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.info("gRPC listening on %s", tcp_address(host, self.port))

    async def load_engine(self) -> Engine:
        """Load the model off the event loop (health answers meanwhile), then turn ready."""
        engine = await asyncio.to_thread(Engine.load, self.config)
        engine.loop.start()
        if self.config.embedding_model is not None:
            # `--embedding-model`: a second model, with its own step thread, served alongside.
            side_config = replace(self.config, model=self.config.embedding_model, embedding_model=None,
                                  lora=None)
            side = await asyncio.to_thread(Engine.load, side_config)
            side.loop.start()
            self.handle.embedding_engine = side
        self.handle.engine = engine
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self._watch_engine(engine))
        logger.info("model ready: serving %s", ", ".join(engine.model.names))
        return engine

    async def _watch_engine(self, engine: Engine) -> None:
        """Readiness follows the step thread: if it dies or its heartbeat goes stale, stop
        advertising SERVING, end every open stream with UNAVAILABLE, and tell engine-serve."""
        await watch_engine(engine, self.server_config.engine_hang_timeout_s)
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.handle.engine_died.set()

    async def drain(self, timeout: float) -> bool:
        """Readiness NOT_SERVING and new work refused (UNAVAILABLE, reason DRAINING), then wait
        up to `timeout` s for in-flight requests. True when they all finished."""
        self.handle.draining = True
        await self.health.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        return await wait_for_idle(self.handle.engine, timeout)

    async def set_not_serving(self) -> None:
        """Liveness and readiness NOT_SERVING: the process is going away (a child died)."""
        for service in ("", READINESS_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = 5.0) -> None:
        self.handle.draining = True
        await self.health.enter_graceful_shutdown()
        # KV-event streams never end on their own: they end now (UNAVAILABLE, DRAINING; a
        # router moves on) instead of being cancelled at the end of the grace period.
        closing = EngineUnavailableError("the server is shutting down", reason="DRAINING")
        for engine in self.handle.engines:
            engine.loop.kv_events.fail(closing)
        await self.server.stop(grace)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.handle.engine is not None:
            self.handle.engine.stop()
        if self.handle.embedding_engine is not None:
            self.handle.embedding_engine.stop()

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()
