"""--served-model-name with several names: every name is accepted, the first is reported."""
from __future__ import annotations

import grpc
import openai
import pytest
from surface_names import ALIAS_NAME, API_KEY, MAIN_NAME
from engine_process import EngineProcess

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc

GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def client(surfaces_server: EngineProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{surfaces_server.http_url}/v1", api_key=API_KEY,
                         max_retries=0, timeout=60)


def test_models_list_every_name_first_one_first(client: openai.OpenAI) -> None:
    assert [card.id for card in client.models.list().data] == [MAIN_NAME, ALIAS_NAME]
    assert client.models.retrieve(ALIAS_NAME).id == ALIAS_NAME


@pytest.mark.parametrize("name", [MAIN_NAME, ALIAS_NAME])
def test_every_name_is_accepted_and_the_first_is_reported(client: openai.OpenAI,
                                                          name: str) -> None:
    completion = client.completions.create(model=name, prompt="Hi", max_tokens=2,
                                           temperature=0)
    assert completion.model == MAIN_NAME
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    assert chat.model == MAIN_NAME
    stream = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        temperature=0, stream=True)
    assert {chunk.model for chunk in stream} == {MAIN_NAME}


def test_unknown_name_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-served", prompt="Hi", max_tokens=2)


def test_grpc_discovery_reports_id_and_aliases(surfaces_server: EngineProcess) -> None:
    with grpc.insecure_channel(surfaces_server.grpc_address) as channel:
        stub = discovery_pb2_grpc.DiscoveryStub(channel)
        info = stub.GetModelInfo(discovery_pb2.GetModelInfoRequest(model=ALIAS_NAME),
                                 metadata=GRPC_AUTH, timeout=10).info
    assert info.id == MAIN_NAME and list(info.aliases) == [ALIAS_NAME]
