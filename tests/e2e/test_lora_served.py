"""Multi-LoRA served: adapters selected by model name over gRPC Generate and the OpenAI SDK
give peft's greedy tokens, /v1/models and Discovery list them with their parent, and adapters
load and unload at runtime (REST routes and Admin RPCs, under the admin key where there is
one) with clear errors for bad ones."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from engine_process import REPO_ROOT, EngineProcess, free_port, start_engine
from greedy_reference import assert_transformers_greedy
from lora_adapters import make_adapter, peft_reference
from transformers import AutoModelForCausalLM, AutoTokenizer

from protoserve.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

pytestmark = pytest.mark.e2e

NEW_TOKENS = 10
PROMPT = "The adapters share one batch"


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_llama_dir, root / "alpha", rank=4,
                              targets=["q_proj", "v_proj", "down_proj"], seed=1),
        "beta": make_adapter(tiny_llama_dir, root / "beta", rank=8,
                             targets=["o_proj", "gate_proj", "up_proj"], seed=2),
        "gamma": make_adapter(tiny_llama_dir, root / "gamma", rank=2, targets=["k_proj"], seed=3),
    }


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, adapters: dict[str, Path]) -> Iterator[EngineProcess]:
    beta = json.dumps({"name": "beta", "path": str(adapters["beta"]),
                       "base_model_name": str(tiny_llama_dir)})
    process = start_engine(
        tiny_llama_dir, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
        "--lora-modules", f"alpha={adapters['alpha']}", beta, "--metrics-compat", role="all",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    try:
        yield process
    finally:
        process.stop()


def _generate(address: str, model: str, prompt_ids: list[int]) -> tuple[list[int], str]:
    request = inference_pb2.GenerateRequest(
        model=model, token_ids=common_pb2.TokenIds(ids=prompt_ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                           ignore_eos=True))
    tokens: list[int] = []
    text = ""
    with grpc.insecure_channel(address) as channel:
        for event in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            if event.HasField("delta"):
                tokens.extend(event.delta.token_ids)
                text += event.delta.text
    return tokens, text


def test_adapters_selected_by_name_equal_peft_on_both_surfaces(
    server: EngineProcess, tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT)["input_ids"]
    base_tokens, base_text = _generate(server.grpc_address, "", prompt_ids)
    assert_transformers_greedy(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir).float().eval(), prompt_ids,
        base_tokens)
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
    for name in ("alpha", "beta"):
        tokens, text = _generate(server.grpc_address, name, prompt_ids)
        assert tokens != base_tokens
        assert_transformers_greedy(
            peft_reference(tiny_llama_dir, adapters[name], merged=False), prompt_ids, tokens)
        completion = client.completions.create(
            model=name, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True})
        assert completion.model == name
        assert completion.choices[0].text == text != base_text


def test_models_and_discovery_list_adapters_with_their_parent(
    server: EngineProcess, tiny_llama_dir: Path
) -> None:
    cards = {card["id"]: card for card in httpx.get(f"{server.http_url}/v1/models").json()["data"]}
    base_id = str(tiny_llama_dir)
    assert cards[base_id]["parent"] is None
    assert cards["alpha"]["parent"] == cards["beta"]["parent"] == base_id
    with grpc.insecure_channel(server.grpc_address) as channel:
        discovery = discovery_pb2_grpc.DiscoveryStub(channel)
        listed = discovery.ListModels(discovery_pb2.ListModelsRequest()).models
        info = discovery.GetModelInfo(discovery_pb2.GetModelInfoRequest(model="beta")).info
    assert {m.id: m.parent for m in listed} == {base_id: "", "alpha": base_id, "beta": base_id}
    assert (info.id, info.parent) == ("beta", base_id)


def test_runtime_load_and_unload_round_trip(
    server: EngineProcess, tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    url = server.http_url
    prompt_ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(PROMPT)["input_ids"]
    loaded = httpx.post(f"{url}/v1/load_lora_adapter",
                        json={"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
    assert loaded.status_code == 200, loaded.text
    assert "gamma" in {c["id"] for c in httpx.get(f"{url}/v1/models").json()["data"]}
    tokens, _ = _generate(server.grpc_address, "gamma", prompt_ids)
    assert_transformers_greedy(
        peft_reference(tiny_llama_dir, adapters["gamma"], merged=True), prompt_ids, tokens)
    again = httpx.post(f"{url}/v1/load_lora_adapter",
                       json={"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert unloaded.status_code == 200, unloaded.text
    gone = httpx.post(f"{url}/v1/completions", json={
        "model": "gamma", "prompt": prompt_ids, "max_tokens": 2})
    assert gone.status_code == 404
    assert httpx.post(f"{url}/v1/unload_lora_adapter",
                      json={"lora_name": "gamma"}).status_code == 404
    # Over gRPC Admin too; the name served again gets the adapter afresh.
    with grpc.insecure_channel(server.grpc_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        admin.LoadLoraAdapter(admin_pb2.LoadLoraAdapterRequest(
            lora_name="gamma", lora_path=str(adapters["alpha"])))
        assert _generate(server.grpc_address, "gamma", prompt_ids)[0] == _generate(
            server.grpc_address, "alpha", prompt_ids)[0]
        admin.UnloadLoraAdapter(admin_pb2.UnloadLoraAdapterRequest(lora_name="gamma"))


def test_bad_adapter_paths_are_refused_naming_them(server: EngineProcess, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    response = httpx.post(f"{server.http_url}/v1/load_lora_adapter",
                          json={"lora_name": "bad", "lora_path": str(missing)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert str(missing) in error["message"] and error["param"] == "lora_path"
    with grpc.insecure_channel(server.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            admin_pb2_grpc.AdminStub(channel).LoadLoraAdapter(admin_pb2.LoadLoraAdapterRequest(
                lora_name="bad", lora_path=str(missing)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(missing) in raised.value.details()


def test_a_bad_lora_module_stops_start_up_naming_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing-adapter"
    done = subprocess.run(
        [sys.executable, "-m", "protoserve.cli.serve", "--role", "engine", "--model",
         str(tiny_llama_dir), "--host", "127.0.0.1", "--grpc-port", str(free_port()),
         "--dtype", "float32", "--kv-cache-memory", "64MiB", "--enable-lora",
         "--lora-modules", f"broken={missing}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"--lora-modules broken: LoRA adapter '{missing}' has no adapter_config.json" in done.stderr


def test_embedding_with_an_adapter_name_is_refused(server: EngineProcess) -> None:
    response = httpx.post(f"{server.http_url}/v1/embeddings",
                          json={"model": "alpha", "input": "pooled by the base model only"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and "LoRA adapter" in error["message"]


def test_adapter_rpcs_on_a_server_without_lora_say_how_to_enable_it(
    shared_server: Callable[..., EngineProcess]
) -> None:
    server = shared_server("--max-model-len", "256")  # the one test_grpc_server.py shares
    with grpc.insecure_channel(server.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            admin_pb2_grpc.AdminStub(channel).LoadLoraAdapter(admin_pb2.LoadLoraAdapterRequest(
                lora_name="x", lora_path="/tmp/x"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--enable-lora" in raised.value.details()


def test_runtime_lora_routes_take_the_admin_key(
    tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """With --admin-api-key, REST adapter loading takes that key (bearer or x-api-key) and
    refuses the client key with the engine's answer naming the admin key, as Admin does over
    gRPC; requests then use the adapter with the client key."""
    process = start_engine(
        tiny_llama_dir, "--enable-lora", "--max-lora-rank", "8", "--api-key", "client-key",
        "--admin-api-key", "admin-key", role="all",
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    try:
        url = process.http_url
        body = {"lora_name": "gamma", "lora_path": str(adapters["gamma"])}

        def load(headers: dict[str, str]) -> httpx.Response:
            return httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers)

        assert load({}).status_code == 401
        refused = load({"Authorization": "Bearer client-key"})
        assert refused.status_code == 401, refused.text
        assert "admin API key is required" in refused.json()["error"]["message"]
        assert load({"Authorization": "Bearer wrong"}).status_code == 401
        loaded = load({"Authorization": "Bearer admin-key"})
        assert loaded.status_code == 200, loaded.text
        client = {"Authorization": "Bearer client-key"}
        completion = httpx.post(f"{url}/v1/completions", headers=client, json={
            "model": "gamma", "prompt": PROMPT, "max_tokens": 2})
        assert completion.status_code == 200, completion.text
        unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"},
                              headers={"x-api-key": "admin-key"})
        assert unloaded.status_code == 200, unloaded.text
    finally:
        process.stop()


def test_bridge_metrics_label_the_running_adapters(server: EngineProcess) -> None:
    """The serving port's lora_requests_info (what a LoRA-aware router scrapes there) names
    the adapter of a request while it runs, and --max-loras, through Discovery/GetLoad."""
    url = server.http_url
    with grpc.insecure_channel(server.grpc_address) as channel:
        load = discovery_pb2_grpc.DiscoveryStub(channel).GetLoad(discovery_pb2.GetLoadRequest())
    assert load.max_lora == 2
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    seen: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
        for _ in stream.iter_lines():  # scraped while the request streams
            page = httpx.get(f"{url}/metrics").text
            [labels] = [line for line in page.splitlines()
                        if line.startswith("vllm:lora_requests_info{")]
            seen.append(labels)
            if 'running_lora_adapters="alpha"' in labels:
                break
    assert 'running_lora_adapters="alpha"' in seen[-1], seen[:3]
    assert 'max_lora="2"' in seen[-1]
