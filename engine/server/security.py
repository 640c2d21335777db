"""Who may call the engine: the bearer-key interceptor and the TLS/mTLS server credentials.

The key travels as gRPC metadata `authorization: Bearer <key>` (the header every gRPC
gateway and client library forwards) and is compared in constant time. Health and reflection
may stay open so that load balancers, Kubernetes probes and grpcurl work without the key.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from engine.server.status import to_rpc_status

AUTHORIZATION_KEY = "authorization"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Both reflection versions: grpcurl and newer clients ask for v1, older ones for v1alpha.
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",
                       "grpc.reflection.v1.ServerReflection")


def _service_of(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    return method.lstrip("/").partition("/")[0]


def _unauthenticated() -> grpc.Status:
    return to_rpc_status(
        grpc.StatusCode.UNAUTHENTICATED,
        "a valid API key is required (metadata 'authorization: Bearer <key>')",
        reason="UNAUTHENTICATED",
    )


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler shape (so (de)serializers still match) whose behaviour only aborts."""

    async def reject_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(_unauthenticated())

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(_unauthenticated())
        yield  # pragma: no cover - makes this an async generator; never reached

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=reject_unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=reject_stream)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=reject_unary)
    return handler._replace(stream_stream=reject_stream)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <api_key>` (UNAUTHENTICATED), except to
    the services named in `exempt_services`."""

    def __init__(self, api_key: str, exempt_services: Iterable[str] = ()) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self._expected = api_key.encode("utf-8")
        self._exempt = frozenset(exempt_services)

    def authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        for key, value in metadata or ():
            if key != AUTHORIZATION_KEY:
                continue
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("utf-8"), self._expected
            ):
                return True
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or _service_of(handler_call_details.method) in self._exempt:
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _rejecting(handler)


@dataclass(frozen=True)
class GrpcTls:
    """PEM files of the gRPC server's TLS; `client_ca_file` enables client-certificate
    verification, `require_client_cert` makes a verified client certificate mandatory."""

    keyfile: str
    certfile: str
    client_ca_file: str | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("requiring client certificates needs --ssl-ca-certs (the CA "
                             "that signs them)")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read the PEM files now, so a missing or unreadable file fails at start-up."""
        key = Path(self.keyfile).read_bytes()
        cert = Path(self.certfile).read_bytes()
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=self.require_client_cert
        )
