"""Quantized models served through both surfaces: engine-serve with --quantization int8 on a
float32 checkpoint, on compressed-tensors W4A16 and W8A8 (int8 activations per token)
checkpoints written by that library, on GPTQ
(asymmetric, act order) and AWQ checkpoints packed as those tools pack, and on a Q4_0 GGUF file
written by the gguf package (config and tokenizer from its metadata) answers gRPC Generate and
the OpenAI SDK with the greedy continuation of transformers running the same dequantized
weights (served in float32, where our forward equals it to 1e-4; for W8A8, transformers
loading the file itself, which quantizes the activations with compressed-tensors' code)."""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_process import EngineProcess, start_engine, start_side_by_side, stop_side_by_side
from model_factory import build_tiny_model
from gguf_checkpoints import transformers_gguf_model, write_gguf
from gptq_awq_checkpoints import reference_weights, write_awq, write_gptq
from served_greedy import grpc_greedy_tokens, openai_greedy_text
from quant_checkpoints import (
    hf_with_weights,
    library_dequantized_model,
    online_reference_weights,
    write_compressed_tensors,
)
from transformers import AutoModelForCausalLM, AutoTokenizer


pytestmark = pytest.mark.e2e

NEW_TOKENS = 12
PROMPT = "The engine serves quantized weights"
CASES = ("int8-online", "w4a16-compressed-tensors", "w8a8-compressed-tensors",
         "gptq-asym-act-order", "awq", "gguf-q4_0")


class Served:
    def __init__(self, model_dir: Path, reference: Any, server: EngineProcess,
                 gguf_file: str | None = None) -> None:
        self.server = server
        tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
        self.prompt_ids = tokenizer(PROMPT)["input_ids"]
        ids = torch.tensor([self.prompt_ids])
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     pad_token_id=0)
        self.expected_ids = out[0, len(self.prompt_ids):].tolist()
        self.expected_text = tokenizer.decode(self.expected_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    root = tmp_path_factory.mktemp("quantized")
    base = build_tiny_model(root / "base", hidden_size=128, initializer_range=0.15)
    ct_dir = write_compressed_tensors(base, root / "w4a16", preset="W4A16", strategy="group",
                                      group_size=32)
    w8a8_dir = write_compressed_tensors(base, root / "w8a8", preset="W8A8", strategy="channel",
                                        group_size=None)
    gptq_dir = write_gptq(base, root / "gptq", sym=False, desc_act=True)
    awq_dir = write_awq(base, root / "awq")
    (root / "gguf").mkdir()
    gguf_path = write_gguf(base, root / "gguf" / "tiny-q4_0.gguf", projections="Q4_0")
    # Per case: what the server loads, its flags, and the tokenizer (a GGUF file carries its own).
    served_from: dict[str, tuple[Path, tuple[str, ...], Path, str | None]] = {
        "int8-online": (base, ("--quantization", "int8"), base, None),
        "w4a16-compressed-tensors": (ct_dir, (), ct_dir, None),
        "w8a8-compressed-tensors": (w8a8_dir, (), w8a8_dir, None),
        "gptq-asym-act-order": (gptq_dir, (), gptq_dir, None),
        "awq": (awq_dir, (), awq_dir, None),
        "gguf-q4_0": (gguf_path, (), gguf_path.parent, gguf_path.name),
    }
    # The servers start side by side while this process builds the references.
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(start_side_by_side, [
            partial(start_engine, model, "--dtype", "float32", *args, "--engine-core", "thread",
                    role="all")
            for model, args, _, _ in (served_from[case] for case in CASES)])
        try:
            references = {
                "int8-online": hf_with_weights(
                    base, online_reference_weights(base, "int8", torch.float32)),
                "w4a16-compressed-tensors": library_dequantized_model(base, ct_dir),
                "w8a8-compressed-tensors": AutoModelForCausalLM.from_pretrained(
                    w8a8_dir, dtype=torch.float32).eval(),
                "gptq-asym-act-order": hf_with_weights(base, reference_weights(gptq_dir)),
                "awq": hf_with_weights(base, reference_weights(awq_dir)),
                "gguf-q4_0": transformers_gguf_model(gguf_path),
            }
        except BaseException:
            stop_side_by_side(starting.result())
            raise
        started = starting.result()  # a failed start raises here, with no server left running
    try:
        yield {
            case: Served(served_from[case][2], references[case], server,
                         gguf_file=served_from[case][3])
            for case, server in zip(CASES, started, strict=True)
        }
    finally:
        stop_side_by_side(started)


@pytest.fixture(params=CASES)
def served(request: pytest.FixtureRequest, servers: dict[str, Served]) -> Served:
    return servers[request.param]


def test_grpc_generate_gives_the_dequantized_reference_tokens(served: Served) -> None:
    tokens = grpc_greedy_tokens(served.server.grpc_address, served.prompt_ids, NEW_TOKENS)
    assert tokens == served.expected_ids


@pytest.mark.parametrize("stream", [False, True])
def test_openai_completion_gives_the_dequantized_reference_text(served: Served,
                                                                stream: bool) -> None:
    text = openai_greedy_text(served.server.http_url, PROMPT, NEW_TOKENS, stream=stream)
    assert text == served.expected_text
