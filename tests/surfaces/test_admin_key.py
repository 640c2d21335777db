"""Admin (abort anyone's request, drain the server) is the operators' service: only
`--admin-api-key` opens it. The client `--api-key` never does; a server with a client key and
no admin key has Admin disabled (PERMISSION_DENIED). Checked on gRPC servers that load no
model: only the interceptor decides here."""
from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from engine_process import free_port

from engine.config import EngineConfig, ModelConfig
from engine.server.grpc_server import EngineServer, GrpcServerConfig
from protoserve.cli.serve import build_parser
from protoserve.cli.surface_args import ADMIN_API_KEY_ENV, bridge_env, grpc_security
from protoserve.v1 import admin_pb2, admin_pb2_grpc, discovery_pb2, discovery_pb2_grpc
from rest_bridge.http_options import ADMIN_KEY_SHA256_ENV

CLIENT, ADMIN = "client-key", "admin-key"
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def _codes(api_key: str | None, admin_key: str | None) -> dict[tuple[str, str | None], object]:
    """{(service, key presented): status code} for Admin/Drain and Discovery/ListModels."""

    async def scenario() -> dict[tuple[str, str | None], object]:
        port = free_port()
        server = EngineServer(EngineConfig(model=ModelConfig(model="unused")),
                              GrpcServerConfig("127.0.0.1", port, api_key=api_key,
                                               admin_api_key=admin_key))
        await server.start()
        codes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                discovery = discovery_pb2_grpc.DiscoveryStub(channel)
                for key in (None, CLIENT, ADMIN):
                    metadata = (("authorization", f"Bearer {key}"),) if key else ()
                    for name, call in (
                        ("admin", admin.Drain(admin_pb2.DrainRequest(), metadata=metadata,
                                              timeout=10)),
                        ("discovery", discovery.ListModels(discovery_pb2.ListModelsRequest(),
                                                           metadata=metadata, timeout=10)),
                    ):
                        try:
                            await call
                            codes[name, key] = grpc.StatusCode.OK
                        except grpc.aio.AioRpcError as error:
                            codes[name, key] = error.code()
        finally:
            await server.stop(0)
        return codes

    return asyncio.run(scenario())


def test_client_key_alone_disables_admin() -> None:
    codes = _codes(CLIENT, None)
    assert {codes["admin", key] for key in (None, CLIENT, ADMIN)} == {
        grpc.StatusCode.PERMISSION_DENIED}
    assert codes["discovery", None] == grpc.StatusCode.UNAUTHENTICATED
    # Past the interceptor (no model loaded here, so the servicer answers UNAVAILABLE).
    assert codes["discovery", CLIENT] not in DENIED


def test_admin_key_opens_admin_and_the_client_key_does_not() -> None:
    codes = _codes(CLIENT, ADMIN)
    assert codes["admin", None] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["admin", CLIENT] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["admin", ADMIN] == grpc.StatusCode.OK
    # The operators' key also works wherever the client key does.
    assert codes["discovery", ADMIN] not in DENIED
    assert codes["discovery", None] == grpc.StatusCode.UNAUTHENTICATED


def test_admin_key_alone_leaves_inference_open() -> None:
    codes = _codes(None, ADMIN)
    assert codes["admin", None] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["admin", ADMIN] == grpc.StatusCode.OK
    assert codes["discovery", None] not in DENIED


def test_engine_serve_flags_and_the_bridge_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["--api-key", CLIENT, "--admin-api-key", ADMIN])
    security = grpc_security(args)
    assert security["api_key"] == CLIENT and security["admin_api_key"] == ADMIN
    monkeypatch.setenv(ADMIN_API_KEY_ENV, ADMIN)
    from_env = grpc_security(build_parser().parse_args([]))
    assert from_env["admin_api_key"] == ADMIN
    # The operators' key stays out of the bridge's environment: only its SHA-256, which the
    # runtime LoRA routes check callers against.
    env = bridge_env(args)
    assert ADMIN_API_KEY_ENV not in env
    assert ADMIN not in env.values()
    assert env[ADMIN_KEY_SHA256_ENV] == hashlib.sha256(ADMIN.encode()).hexdigest()
    monkeypatch.delenv(ADMIN_API_KEY_ENV)
    client_only = bridge_env(build_parser().parse_args(["--api-key", CLIENT]))
    assert ADMIN_KEY_SHA256_ENV not in client_only
