"""Who may call the engine: the bearer-key interceptor and the TLS/mTLS server credentials.

The key travels as gRPC metadata `authorization: Bearer <key>` (the header every gRPC
gateway and client library forwards) and is compared in constant time. Health and reflection
may stay open so that load balancers, Kubernetes probes and grpcurl work without the key.

Two principals: clients (`--api-key`: Inference, Tokenizer, Discovery) and operators
(`--admin-api-key`: also Admin, which aborts anyone's requests and drains the server). The
client key never opens Admin: on a server with a client key and no admin key, Admin is
disabled (PERMISSION_DENIED). A server with neither key is open to all, Admin included.
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
ADMIN_SERVICE = "protoserve.v1.Admin"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Both reflection versions: grpcurl and newer clients ask for v1, older ones for v1alpha.
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection",
                       "grpc.reflection.v1.ServerReflection")


def _service_of(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    return method.lstrip("/").partition("/")[0]


def _unauthenticated(what: str = "a valid API key") -> grpc.Status:
    return to_rpc_status(
        grpc.StatusCode.UNAUTHENTICATED,
        f"{what} is required (metadata 'authorization: Bearer <key>')",
        reason="UNAUTHENTICATED",
    )


def _admin_disabled() -> grpc.Status:
    return to_rpc_status(
        grpc.StatusCode.PERMISSION_DENIED,
        "the Admin service is disabled on this server: the API key does not grant it; start "
        "the server with --admin-api-key to use it",
        reason="ADMIN_DISABLED",
    )


def _rejecting(handler: grpc.RpcMethodHandler,
               status: grpc.Status | None = None) -> grpc.RpcMethodHandler:
    """The same handler shape (so (de)serializers still match) whose behaviour only aborts."""
    status = status or _unauthenticated()

    async def reject_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator; never reached

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=reject_unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=reject_stream)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=reject_unary)
    return handler._replace(stream_stream=reject_stream)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <key>` (UNAUTHENTICATED), except to the
    services named in `exempt_services`: the admin key for Admin, either key for the rest
    (no client key: the rest is open). Admin without an admin key: PERMISSION_DENIED."""

    def __init__(self, api_key: str | None, exempt_services: Iterable[str] = (),
                 admin_key: str | None = None) -> None:
        if api_key == "" or admin_key == "":
            raise ValueError("an API key must not be empty")
        if api_key is None and admin_key is None:
            raise ValueError("an API key or an admin API key is required")
        self._client = api_key.encode("utf-8") if api_key is not None else None
        self._admin = admin_key.encode("utf-8") if admin_key is not None else None
        self._exempt = frozenset(exempt_services)

    def _presented(self, metadata: Iterable[tuple[str, Any]] | None) -> list[bytes]:
        tokens = []
        for key, value in metadata or ():
            if key != AUTHORIZATION_KEY:
                continue
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                tokens.append(token.strip().encode("utf-8"))
        return tokens

    @staticmethod
    def _matches(tokens: list[bytes], expected: bytes | None) -> bool:
        return expected is not None and any(hmac.compare_digest(t, expected) for t in tokens)

    def authorized(self, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        """May this caller use the client services (Inference, Tokenizer, Discovery)?"""
        if self._client is None:
            return True
        tokens = self._presented(metadata)
        return self._matches(tokens, self._client) or self._matches(tokens, self._admin)

    def _admin_status(self, metadata: Iterable[tuple[str, Any]] | None) -> grpc.Status | None:
        """None when the caller may use Admin, else the status that refuses it."""
        if self._admin is None:
            return _admin_disabled()
        if self._matches(self._presented(metadata), self._admin):
            return None
        return _unauthenticated("the admin API key")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = _service_of(handler_call_details.method)
        if handler is None or service in self._exempt:
            return handler
        metadata = handler_call_details.invocation_metadata
        if service == ADMIN_SERVICE:
            status = self._admin_status(metadata)
            return handler if status is None else _rejecting(handler, status)
        if self.authorized(metadata):
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
