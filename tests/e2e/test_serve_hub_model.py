"""engine-serve --model org/name: downloaded once from the Hub (a local endpoint,
tests/hub_endpoint.py) before anything starts, then served under the hub id."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest
from engine_process import start_engine
from hub_endpoint import HubEndpoint


@pytest.mark.e2e
def test_engine_serve_downloads_a_hub_model_once_and_serves_it(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    with HubEndpoint() as hub:
        sha = hub.add_commit("acme/tiny-llama", tiny_llama_dir)
        server = start_engine(Path("acme/tiny-llama"), "--download-dir", str(tmp_path / "cache"),
                              role="all",
                              # Other modules set HF_HUB_OFFLINE for the session: this
                              # server must reach the local hub.
                              env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        try:
            client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none",
                                   max_retries=0, timeout=60)
            assert [m.id for m in client.models.list().data] == ["acme/tiny-llama"]
            completion = client.completions.create(model="acme/tiny-llama", prompt="Hello",
                                                   max_tokens=3, temperature=0)
            assert completion.usage is not None and completion.usage.completion_tokens >= 1
        finally:
            server.stop()
        # One process resolved the revision and fetched each file; the engine core process
        # read the snapshot directory it was handed.
        assert hub.requests.count(("GET", "/api/models/acme/tiny-llama")) == 1
        weights = f"/acme/tiny-llama/resolve/{sha}/model.safetensors"
        assert hub.requests.count(("GET", weights)) == 1
