"""Every decoder family served through both surfaces: a real engine-serve on a tiny
random-weight model of the family answers gRPC Generate and the OpenAI SDK with
transformers' greedy continuation (the tokens over gRPC, their text over REST, streamed and
not)."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from engine_process import EngineProcess, start_engine
from family_configs import FAMILIES
from model_factory import build_tiny_model
from served_greedy import grpc_greedy_tokens, openai_greedy_text
from transformers import AutoModelForCausalLM, AutoTokenizer


pytestmark = pytest.mark.e2e

# Llama is what every other served test runs on.
SERVED_FAMILIES = [family for family in FAMILIES if family != "llama"]
NEW_TOKENS = 12
PROMPT = "The engine serves every family of models"


class ServedFamily:
    def __init__(self, model_dir: Path, server: EngineProcess) -> None:
        self.model_dir, self.server = model_dir, server
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompt_ids = self.tokenizer(PROMPT)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = torch.tensor([self.prompt_ids])
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
            )
        self.expected_ids = out[0, len(self.prompt_ids):].tolist()
        # The server skips special tokens in text, as the reference server does by default.
        self.expected_text = self.tokenizer.decode(self.expected_ids, skip_special_tokens=True)


def _start(family: str, root: Path) -> tuple[Path, EngineProcess]:
    # Larger-than-default weights: peaked logits, so greedy ties cannot flip between
    # implementations.
    model_dir = build_tiny_model(root / family, arch=family, initializer_range=0.15)
    return model_dir, start_engine(model_dir, "--engine-core", "thread", role="all")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServedFamily]]:
    """One engine-serve per family, started side by side (start-up is mostly waiting on
    imports, so the module costs about one start per core, not one per family)."""
    root = tmp_path_factory.mktemp("families")
    with ThreadPoolExecutor(len(SERVED_FAMILIES)) as pool:
        started = [pool.submit(_start, family, root) for family in SERVED_FAMILIES]
    running = [future.result() for future in started if future.exception() is None]
    try:
        for future in started:
            future.result()  # re-raises a failed start, after the others are recorded
        yield {family: ServedFamily(model_dir, server)
               for family, (model_dir, server) in zip(SERVED_FAMILIES, running, strict=True)}
    finally:
        with ThreadPoolExecutor(max(len(running), 1)) as pool:
            list(pool.map(EngineProcess.stop, [server for _, server in running]))


@pytest.fixture(params=SERVED_FAMILIES)
def served(request: pytest.FixtureRequest, servers: dict[str, ServedFamily]) -> ServedFamily:
    return servers[request.param]


def test_grpc_generate_gives_transformers_greedy_tokens(served: ServedFamily) -> None:
    tokens = grpc_greedy_tokens(served.server.grpc_address, served.prompt_ids, NEW_TOKENS)
    assert tokens == served.expected_ids


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completion_gives_transformers_greedy_text(
    served: ServedFamily, stream: bool
) -> None:
    text = openai_greedy_text(served.server.http_url, PROMPT, NEW_TOKENS, stream=stream)
    assert text == served.expected_text
