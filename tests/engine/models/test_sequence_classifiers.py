"""Our RoBERTa encoders and sequence-classification heads against their references, on tiny
random-weight checkpoints saved here: transformers' logits and hidden states, and
sentence-transformers' CrossEncoder scores for pairs tokenized by our score path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from cross_encoder_factory import make_bert_classifier, make_xlmr_classifier, make_xlmr_encoder
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from engine.config import ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledPooling
from engine.frontend.embedding_input import EmbeddingLimits
from engine.frontend.score_input import ScoreInputProcessor, ScoreRequest
from engine.pooling_params import PoolingParams
from engine.runner.embedding_runner import EmbeddingRunner
from engine.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY = "what is the capital of france"
DOCUMENTS = [
    "paris is the capital and largest city of france",
    "bananas are yellow",
    "berlin is the capital of germany and the quick brown fox jumps over the lazy dog",
]
TEXTS = [QUERY, *DOCUMENTS, "a"]
# bf16 weights and activations (8 mantissa bits) through 2 layers and the head: every logit
# within this fraction of the largest float32 logit of transformers'.
BF16_RELATIVE_BOUND = 0.1


def run_pooling(runner: EmbeddingRunner, jobs: list[ScheduledPooling]) -> list[torch.Tensor]:
    out = runner.execute(ScheduledBatch(requests=[], num_scheduled_tokens=0, pooling=jobs))
    return [torch.tensor(out.embeddings[job.request_id]) for job in jobs]


def raw_jobs(token_lists: list[list[int]]) -> list[ScheduledPooling]:
    return [ScheduledPooling(f"r{i}", ids, PoolingParams(normalize=False))
            for i, ids in enumerate(token_lists)]


def pair_jobs(model_dir: Path, runner: EmbeddingRunner) -> list[ScheduledPooling]:
    """The query against every document, tokenized by the Score path."""
    processor = ScoreInputProcessor(
        Tokenizer.load(str(model_dir), announce=False),
        EmbeddingLimits(runner.loaded.max_model_len, runner.loaded.vocab_size, 32))
    requests = processor.cross_encoder_requests(
        ScoreRequest("s", text_1=(QUERY,), text_2=tuple(DOCUMENTS)))
    return [ScheduledPooling(r.request_id, r.prompt_token_ids, r.pooling_params)
            for r in requests]


@pytest.fixture(scope="module")
def bert_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_classifier(tmp_path_factory.mktemp("bert-ce"), num_labels=1)


@pytest.fixture(scope="module")
def xlmr_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_xlmr_classifier(tmp_path_factory.mktemp("xlmr-cls"), num_labels=3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bert_cross_encoder_scores_equal_sentence_transformers(
    bert_cross_encoder: Path, dtype: str
) -> None:
    st = pytest.importorskip("sentence_transformers")
    runner = EmbeddingRunner(ModelConfig(str(bert_cross_encoder), dtype=dtype))
    jobs = pair_jobs(bert_cross_encoder, runner)
    # BERT pairs carry token types: the second segment starts after the first [SEP].
    assert all(job.params.second_segment_start for job in jobs)
    logits = torch.stack(run_pooling(runner, jobs)).squeeze(1)
    reference = st.CrossEncoder(str(bert_cross_encoder), device="cpu")
    expected = torch.tensor(reference.predict([(QUERY, d) for d in DOCUMENTS]))
    assert expected.std() > 1e-3  # the inputs are told apart
    if dtype == "bfloat16":
        expected_logits = torch.logit(expected.double()).float()
        bound = BF16_RELATIVE_BOUND * float(expected_logits.abs().max())
        torch.testing.assert_close(logits, expected_logits, atol=bound, rtol=0)
        return
    # CrossEncoder's default activation for one logit is the sigmoid (what Score applies).
    torch.testing.assert_close(torch.sigmoid(logits), expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xlmr_classifier_logits_equal_transformers(xlmr_classifier: Path, dtype: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(xlmr_classifier))
    runner = EmbeddingRunner(ModelConfig(str(xlmr_classifier), dtype=dtype))
    ours = torch.stack(run_pooling(runner, raw_jobs([tokenizer.encode(t) for t in TEXTS])))
    reference = AutoModelForSequenceClassification.from_pretrained(str(xlmr_classifier)).eval()
    with torch.no_grad():
        expected = torch.cat([reference(**tokenizer(t, return_tensors="pt")).logits
                              for t in TEXTS])
    scale = float(expected.abs().max())
    # float32: rounding of sums in another order, relative to the logits' scale.
    tolerance = (1e-5 * max(1.0, scale) if dtype == "float32"
                 else BF16_RELATIVE_BOUND * scale)
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=0)
    # The classes still come out in the same order.
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


def test_xlmr_pairs_match_transformers_pair_encoding(xlmr_classifier: Path) -> None:
    """RoBERTa-style pairs (<s> a </s></s> b </s>, one token type) through the score path."""
    runner = EmbeddingRunner(ModelConfig(str(xlmr_classifier), dtype="float32"))
    jobs = pair_jobs(xlmr_classifier, runner)
    assert all(job.params.second_segment_start is None for job in jobs)
    tokenizer = AutoTokenizer.from_pretrained(str(xlmr_classifier))
    reference = AutoModelForSequenceClassification.from_pretrained(str(xlmr_classifier)).eval()
    with torch.no_grad():
        expected = reference(**tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, padding=True,
                                         return_tensors="pt")).logits
    torch.testing.assert_close(torch.stack(run_pooling(runner, jobs)), expected,
                               atol=1e-5, rtol=0)


def test_xlmr_encoder_cls_pooling_equals_transformers(tmp_path: Path) -> None:
    model_dir = make_xlmr_encoder(tmp_path / "xlmr")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    runner = EmbeddingRunner(ModelConfig(str(model_dir), dtype="float32"))
    # Positions start at padding_idx + 1: a 130-row table takes 128 tokens.
    assert runner.loaded.max_model_len == 128
    ours = run_pooling(runner, raw_jobs([tokenizer.encode(t) for t in TEXTS]))
    reference = AutoModel.from_pretrained(str(model_dir)).eval()
    for text, vector in zip(TEXTS, ours, strict=True):
        with torch.no_grad():
            hidden = reference(**tokenizer(text, return_tensors="pt")).last_hidden_state
        torch.testing.assert_close(vector, hidden[0, 0], atol=1e-5, rtol=0)
