"""TLS on both servers from one certificate, and mTLS on gRPC, against a throwaway CA."""
from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from engine_process import EngineProcess, start_engine
from surface_certs import CertFiles, make_certs

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _client_credentials(certs: CertFiles, *, with_client_cert: bool) -> grpc.ChannelCredentials:
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes(),
        certificate_chain=certs.client_cert.read_bytes(),
    )


@pytest.fixture(scope="module")
def tls_server(tiny_llama_dir: Path, certs: CertFiles) -> Iterator[EngineProcess]:
    server = start_engine(
        tiny_llama_dir,
        "--ssl-keyfile", str(certs.server_key), "--ssl-certfile", str(certs.server_cert),
        "--ssl-ca-certs", str(certs.ca), "--grpc-require-client-cert",
        role="all",
        channel_credentials=_client_credentials(certs, with_client_cert=True),
        https_ca=str(certs.ca),
    )
    try:
        yield server
    finally:
        server.stop()


def _list_models(address: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        reply = stub.ListModels(discovery_pb2.ListModelsRequest(), timeout=10)
        return [model.id for model in reply.models]


def test_grpc_mtls_accepts_a_client_certificate(tls_server: EngineProcess,
                                                 certs: CertFiles) -> None:
    credentials = _client_credentials(certs, with_client_cert=True)
    assert _list_models(tls_server.grpc_address, credentials)


def test_grpc_refuses_clients_without_a_certificate_or_tls(tls_server: EngineProcess,
                                                            certs: CertFiles) -> None:
    for credentials in (_client_credentials(certs, with_client_cert=False), None):
        with pytest.raises(grpc.RpcError) as caught:
            _list_models(tls_server.grpc_address, credentials)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rest_serves_https_verified_by_the_ca(tls_server: EngineProcess,
                                               certs: CertFiles) -> None:
    assert tls_server.http_url is not None and tls_server.http_url.startswith("https://")
    context = ssl.create_default_context(cafile=str(certs.ca))
    # Closed at the end: an idle TLS keep-alive connection left open makes the server's
    # shutdown wait for a TLS close the client never answers.
    with httpx.Client(verify=context) as http_client:
        client = openai.OpenAI(base_url=f"{tls_server.http_url}/v1", api_key="unused",
                               max_retries=0, timeout=60, http_client=http_client)
        model = client.models.list().data[0].id
        completion = client.completions.create(model=model, prompt="Hi", max_tokens=2,
                                               temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    # An unknown CA is refused, and plain HTTP on the TLS port gets no answer.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_server.http_url}/ping", timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(tls_server.http_url.replace("https://", "http://") + "/ping", timeout=10)
