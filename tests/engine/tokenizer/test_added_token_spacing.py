"""`spaces_between_special_tokens` in the incremental detokenizer, against the reference
server's rendering written from transformers' primitives (special_token_spacing_reference)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from model_factory import save_tiny_tokenizer
from special_token_spacing_reference import reference_output_text, reference_spaced_text
from transformers import AutoTokenizer

from engine.tokenizer import Tokenizer

PROMPT_TEXTS = ("The harbor woke", "hello world", "42 café", "a\n", " naïve")


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory: pytest.TempPathFactory):
    directory: Path = save_tiny_tokenizer(tmp_path_factory.mktemp("spacing-tok"))
    return Tokenizer.load(str(directory)), AutoTokenizer.from_pretrained(str(directory))


def _stream(tokenizer: Tokenizer, prompt: list[int], output: list[int], rng: random.Random,
            **options: bool) -> str:
    detokenizer = tokenizer.new_detokenizer(prompt, **options)
    pieces, position = [], 0
    while position < len(output):
        size = rng.choice((1, 1, 2, 3))
        pieces.append(detokenizer.step(output[position : position + size]))
        position += size
    return "".join(pieces) + detokenizer.flush()


def test_added_tokens_are_set_off_by_spaces(tokenizer_pair) -> None:
    tokenizer, hf = tokenizer_pair
    im_start, im_end = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    hi, ok = hf.encode("Hi!", add_special_tokens=False), hf.encode("ok", add_special_tokens=False)
    output = [*hi, im_end, im_start, *ok, hf.eos_token_id]
    rng = random.Random(0)

    def text(**options: bool) -> str:
        return _stream(tokenizer, [], output, rng, **options)

    assert text(skip_special_tokens=False) == "Hi! <|im_end|> <|im_start|> ok <|end_of_text|>"
    assert text(skip_special_tokens=False) == reference_spaced_text(hf, output)
    assert text(skip_special_tokens=False, spaces_between_special_tokens=False) == (
        "Hi!<|im_end|><|im_start|>ok<|end_of_text|>"
    )
    # Skipped special tokens leave nothing behind, spaced or not.
    assert text(skip_special_tokens=True) == "Hi!ok"
    assert text(skip_special_tokens=True, spaces_between_special_tokens=False) == "Hi!ok"


def test_streamed_random_ids_equal_the_reference_rendering(tokenizer_pair) -> None:
    tokenizer, hf = tokenizer_pair
    rng = random.Random(7)
    added = sorted(hf.get_added_vocab().values())
    for _ in range(300):
        prompt = hf.encode(rng.choice(PROMPT_TEXTS), add_special_tokens=rng.random() < 0.5)
        if rng.random() < 0.3:
            prompt.append(rng.choice(added))  # a prompt that ends on an added token
        # Added tokens often enough that they sit next to each other and to text.
        output = [rng.choice(added) if rng.random() < 0.3 else rng.randrange(len(added), len(hf))
                  for _ in range(rng.randint(1, 25))]
        expected = reference_output_text(hf, prompt, output)
        assert _stream(tokenizer, prompt, output, rng, skip_special_tokens=False) == expected, (
            prompt, output)
