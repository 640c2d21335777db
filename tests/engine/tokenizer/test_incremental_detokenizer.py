"""IncrementalDetokenizer against transformers' full decode, on random token streams."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from model_factory import save_tiny_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
TEXT_PIECES = (
    "hello", " world", " the", " river", ",", ".", " ", "\n", "  ", "42", " bread",
    "é", "ü", "ñ", "Ø", " café", " naïve", "Ω", "λόγος", " Καλημέρα",
    "今日", "は", "天気", "中文", "도서관",
    "🙂", "🎉", "❤️", "👍🏽", "🏔️", "∞", "—",
)


@pytest.fixture(scope="module", params=[500, 2000], ids=["vocab500", "vocab2000"])
def tokenizer_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tokenizer, PreTrainedTokenizerBase]:
    directory = save_tiny_tokenizer(
        tmp_path_factory.mktemp(f"tok{request.param}"), vocab_size=request.param
    )
    return Tokenizer.load(str(directory)), AutoTokenizer.from_pretrained(str(directory))


def _stream(
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    output_ids: list[int],
    rng: random.Random,
    *,
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool = False,
) -> list[str]:
    """Feed output_ids in random chunks (mostly 1-3 tokens); return every step's text and
    the flush."""
    detokenizer = tokenizer.new_detokenizer(
        prompt_ids,
        skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
    )
    pieces, position = [], 0
    while position < len(output_ids):
        size = rng.choice((1, 1, 2, 3, 8))
        pieces.append(detokenizer.step(output_ids[position : position + size]))
        position += size
    pieces.append(detokenizer.flush())
    return pieces


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randint(1, 25)))


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_ids_concatenate_to_full_decode(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase], skip_special_tokens: bool
) -> None:
    tokenizer, reference = tokenizer_pair
    rng = random.Random(1234)
    for _ in range(300):
        output_ids = [rng.randrange(reference.vocab_size) for _ in range(rng.randint(1, 30))]
        prompt_ids = reference.encode(_random_text(rng), add_special_tokens=True)
        pieces = _stream(
            tokenizer, prompt_ids, output_ids, rng, skip_special_tokens=skip_special_tokens
        )
        expected = reference.decode(output_ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == expected, output_ids
        if REPLACEMENT_CHAR not in expected:
            assert all(REPLACEMENT_CHAR not in piece for piece in pieces), output_ids


def test_multilingual_text_streams_back_exactly(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, reference = tokenizer_pair
    rng = random.Random(99)
    for _ in range(300):
        text = _random_text(rng)
        output_ids = reference.encode(text, add_special_tokens=False)
        prompt_ids = reference.encode(_random_text(rng), add_special_tokens=True)
        pieces = _stream(tokenizer, prompt_ids, output_ids, rng, skip_special_tokens=True)
        assert "".join(pieces) == reference.decode(output_ids, skip_special_tokens=True) == text
        assert all(REPLACEMENT_CHAR not in piece for piece in pieces), text


def test_incomplete_character_is_held_until_completed(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, reference = tokenizer_pair
    ids = reference.encode("ok🙂", add_special_tokens=False)
    # Byte-level BPE splits the 4-byte emoji across tokens at this vocabulary size.
    partial = [i for i in range(1, len(ids)) if REPLACEMENT_CHAR in reference.decode(ids[:i])]
    assert partial, reference.convert_ids_to_tokens(ids)
    detokenizer = tokenizer.new_detokenizer([])
    emitted = detokenizer.step(ids[: partial[0]])
    assert emitted == reference.decode(ids[: partial[0]]).rstrip(REPLACEMENT_CHAR) == "ok"
    assert emitted + detokenizer.step(ids[partial[0] :]) + detokenizer.flush() == "ok🙂"


def test_flush_releases_a_dangling_partial_character(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, reference = tokenizer_pair
    ids = reference.encode("🙂", add_special_tokens=False)[:-1]
    detokenizer = tokenizer.new_detokenizer([])
    assert detokenizer.step(ids) == ""
    assert detokenizer.flush() == reference.decode(ids)
    assert detokenizer.flush() == ""


def test_prompt_text_is_never_emitted(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, reference = tokenizer_pair
    prompt_ids = reference.encode("The harbor woke", add_special_tokens=True)
    output_ids = reference.encode(" before the town", add_special_tokens=False)
    detokenizer = tokenizer.new_detokenizer(prompt_ids)
    text = "".join(detokenizer.step([i]) for i in output_ids) + detokenizer.flush()
    assert text == " before the town"


def test_special_tokens_follow_skip_flag(
    tokenizer_pair: tuple[Tokenizer, PreTrainedTokenizerBase],
) -> None:
    tokenizer, reference = tokenizer_pair
    output_ids = [
        *reference.encode("Hi", add_special_tokens=False),
        reference.convert_tokens_to_ids("<|im_end|>"),
        reference.eos_token_id,
    ]
    for skip in (True, False):
        detokenizer = tokenizer.new_detokenizer(
            [], skip_special_tokens=skip, spaces_between_special_tokens=False
        )
        text = detokenizer.step(output_ids) + detokenizer.flush()
        assert text == reference.decode(output_ids, skip_special_tokens=skip)
    assert "<|im_end|>" in reference.decode(output_ids, skip_special_tokens=False)
