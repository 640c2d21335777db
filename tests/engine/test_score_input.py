"""Score inputs: how text_1 and text_2 pair up, and the refusals that name the field; pairs
tokenized exactly as the model's own tokenizer tokenizes a pair."""
from __future__ import annotations

from pathlib import Path

import pytest
from cross_encoder_factory import make_bert_classifier
from transformers import AutoTokenizer

from engine.errors import ContextLengthError, InvalidRequestError
from engine.frontend.embedding_input import EmbeddingLimits
from engine.frontend.score_input import ScoreInputProcessor, ScoreRequest, score_pairs
from engine.tokenizer import Tokenizer


def request(text_1: tuple[str, ...], text_2: tuple[str, ...], **kw) -> ScoreRequest:
    return ScoreRequest("r", text_1=text_1, text_2=text_2, **kw)


def test_one_text_1_is_broadcast_and_equal_lists_zip() -> None:
    assert score_pairs(request(("q",), ("a", "b"))) == [("q", "a"), ("q", "b")]
    assert score_pairs(request(("q", "r"), ("a", "b"))) == [("q", "a"), ("r", "b")]


@pytest.mark.parametrize(("text_1", "text_2", "field"), [
    ((), ("a",), "text_1"),
    (("q",), (), "text_2"),
    (("q", "r"), ("a", "b", "c"), "text_1"),
    (("q",), ("a", ""), "text_2"),
])
def test_bad_pairs_name_the_field(text_1, text_2, field: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        score_pairs(request(text_1, text_2))
    assert refused.value.field == field


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert_classifier(tmp_path_factory.mktemp("bert-ce"))


def test_pairs_tokenize_as_the_model_tokenizer_does(bert_dir: Path) -> None:
    processor = ScoreInputProcessor(Tokenizer.load(str(bert_dir), announce=False),
                                    EmbeddingLimits(64, 1000, 32))
    reference = AutoTokenizer.from_pretrained(str(bert_dir))
    [core] = processor.cross_encoder_requests(request(("capital of france",), ("paris",)))
    encoded = reference("capital of france", "paris")
    assert list(core.prompt_token_ids) == encoded["input_ids"]
    assert core.pooling_params.second_segment_start == encoded["token_type_ids"].index(1)
    assert core.pooling_params.normalize is False
    with pytest.raises(InvalidRequestError) as refused:
        processor.cross_encoder_requests(request(("a",), ("b",), truncate_prompt_tokens=3))
    assert refused.value.field == "truncate_prompt_tokens"
    with pytest.raises(ContextLengthError):
        processor.cross_encoder_requests(request(("capital " * 80,), ("paris",)))
    [kept] = processor.cross_encoder_requests(
        request(("capital " * 80,), ("paris",), truncate_prompt_tokens=10))
    assert len(kept.prompt_token_ids) == 10
