"""The model's generation_config.json sampling defaults apply to served requests that leave
the fields unset (the reference server's default, --generation-config auto), overrides win,
and Discovery and /v1/models say which defaults are in force."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import EngineProcess, start_engine

from protoserve.v1 import (
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    from model_factory import build_tiny_model

    model = build_tiny_model(tmp_path_factory.mktemp("generation-config"))
    path = model / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    # Greedy by default and a short default length; the override makes it 7 tokens.
    config.update({"temperature": 0.0, "max_new_tokens": 5, "top_p": 0.9})
    path.write_text(json.dumps(config))
    handle = start_engine(model, "--override-generation-config", '{"max_new_tokens": 7}',
                          role="all")
    try:
        yield handle
    finally:
        handle.stop()


def _generate(server: EngineProcess, **sampling) -> list[int]:
    request = inference_pb2.GenerateRequest(
        text="Once upon a time", sampling=common_pb2.SamplingParams(ignore_eos=True, **sampling))
    with grpc.insecure_channel(server.grpc_address) as channel:
        events = list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60))
    return [t for e in events if e.WhichOneof("event") == "delta" for t in e.delta.token_ids]


def test_unset_fields_take_the_model_defaults(server: EngineProcess) -> None:
    # No temperature, no max_tokens: greedy (the model's 0.0) for 7 tokens (the override).
    first, second = _generate(server), _generate(server)
    assert len(first) == 7 and first == second
    assert first == _generate(server, temperature=0.0, max_tokens=7)
    # Set fields win over the defaults.
    assert len(_generate(server, max_tokens=3)) == 3


def test_discovery_and_models_show_the_defaults(server: EngineProcess) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).ListModels(
            discovery_pb2.ListModelsRequest(), timeout=10)
    expected = {"temperature": 0.0, "max_tokens": 7.0, "top_p": 0.9}
    assert dict(reply.models[0].sampling_defaults) == pytest.approx(expected)
    card = httpx.get(f"{server.http_url}/v1/models", timeout=10).json()["data"][0]
    assert card["sampling_defaults"] == pytest.approx(expected)
