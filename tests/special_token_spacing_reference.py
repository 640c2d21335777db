"""The reference server's `spaces_between_special_tokens` rendering (its detokenizer's
slow-tokenizer path, skip_special_tokens=False), written from transformers' tokenizer
primitives only, for tests to compare the engine's detokenizer against."""
from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def reference_spaced_text(hf: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """Runs of ordinary tokens become text through convert_tokens_to_string, added tokens stay
    as they are, and the pieces are joined by single spaces."""
    added_vocab = hf.get_added_vocab()
    pieces: list[str] = []
    run: list[str] = []
    for token in hf.convert_ids_to_tokens(token_ids):
        if token in added_vocab:
            if run:
                pieces.append(hf.convert_tokens_to_string(run))
                run = []
            pieces.append(token)
        else:
            run.append(token)
    if run:
        pieces.append(hf.convert_tokens_to_string(run))
    return " ".join(pieces)


def reference_output_text(hf: PreTrainedTokenizerBase, prompt: list[int], output: list[int]) -> str:
    """What the output adds to the prompt's rendering: the prompt is the left context, so an
    added token right after the prompt is set off from it too."""
    whole = reference_spaced_text(hf, prompt + output)
    before = reference_spaced_text(hf, prompt)
    assert whole.startswith(before)
    return whole[len(before):]
