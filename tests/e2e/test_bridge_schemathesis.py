"""Schemathesis against the bridge's own OpenAPI document with all of its default checks: no
5xx, status codes, content types and bodies as declared, schema-violating requests refused and
schema-valid ones accepted (a live engine behind it, tiny model, a small budget per route)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from engine_process import REPO_ROOT, EngineProcess, free_port
from fuzz_budget import examples
from mesh_helpers import wait_idle, wait_until

pytest.importorskip("schemathesis", reason="pip install schemathesis")
from openapi_fuzz import run_schemathesis, served_model  # noqa: E402

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def engine(shared_server: Callable[..., EngineProcess], tiny_llama_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> EngineProcess:
    """The tiny Llama as the gRPC tests serve it, plus a tiny BERT cross-encoder as
    `--embedding-model`: unnamed scoring, classify and pooling calls go to it, so their
    schema-valid requests are answered (a generative model refuses them). It renders chat
    inputs with the Llama's template, as /v1/embeddings' chat form now reaches it."""
    from cross_encoder_factory import make_bert_classifier
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(tiny_llama_dir)).chat_template
    cross_encoder = make_bert_classifier(tmp_path_factory.mktemp("fuzz-ce"), max_positions=512,
                                         chat_template=template)
    return shared_server("--max-model-len", "256", "--embedding-model", str(cross_encoder))


@pytest.fixture(scope="module")
def bridge_url(engine: EngineProcess) -> Iterator[str]:
    port = free_port()
    bridge = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--engine-address", engine.grpc_address,
         "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"],
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/ping", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_until(up, 120, "the bridge answers")
        yield url
    finally:
        bridge.terminate()
        bridge.wait(timeout=15)


def test_default_checks_pass_on_every_route(bridge_url: str, engine: EngineProcess) -> None:
    result = run_schemathesis(bridge_url, served_model(engine.grpc_address),
                              max_examples=examples(5), seed=16, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    # Every operation the document has was tested (none skipped as untestable).
    assert f"Tested: {_operation_count(bridge_url)}" in result.stdout, result.stdout[-3000:]
    # Nothing was left running or holding KV blocks, and the engine still serves.
    with grpc.insecure_channel(engine.grpc_address) as channel:
        wait_idle(channel, 30)
    assert httpx.get(f"{bridge_url}/health", timeout=10).status_code == 200


def _operation_count(bridge_url: str) -> int:
    document = httpx.get(f"{bridge_url}/openapi.json", timeout=10).json()
    return sum(method in _HTTP_METHODS for operations in document["paths"].values()
               for method in operations)


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
