"""`spaces_between_special_tokens`: added tokens set off from their neighbours by spaces.

A fast tokenizer's decode writes an added token's text (`<|im_end|>`, `[TOOL_CALLS]`) straight
against the text around it. The reference server's detokenizer, on its slow-tokenizer path,
renders output instead as pieces joined by one space each, where a piece is either an added
token's text or the text of a run of ordinary tokens between two added tokens:

    ids     [Hi, !, <|im_end|>, <|im_start|>, ok]
    pieces  ["Hi!", "<|im_end|>", "<|im_start|>", "ok"]
    text    "Hi! <|im_end|> <|im_start|> ok"        (without spacing: "Hi!<|im_end|><|im_start|>ok")

`AddedTokenSpacing` is that rendering behind the detokenizer's `TokenDecoder` protocol. The
incremental detokenizer stays exact with it: appending tokens only extends the last run's
text (a prefix of its longer decoding, for byte-level BPE) or appends " " + a new piece, so
an emitted window's text remains a prefix of every longer window's text.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class RunDecoder(Protocol):
    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


class AddedTokenSpacing:
    """Decodes runs of ordinary tokens with `run_decoder` and joins them and the added tokens'
    texts with single spaces. Immutable; one per tokenizer."""

    def __init__(
        self,
        run_decoder: RunDecoder,
        added_token_texts: Mapping[int, str],
        special_token_ids: frozenset[int],
    ) -> None:
        self._run_decoder = run_decoder
        self._added_token_texts = dict(added_token_texts)
        self._special_token_ids = special_token_ids

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        run: list[int] = []
        for token_id in token_ids:
            # A skipped special token leaves no piece: the runs on either side join up.
            if skip_special_tokens and token_id in self._special_token_ids:
                continue
            text = self._added_token_texts.get(token_id)
            if text is None:
                run.append(token_id)
                continue
            if run:
                pieces.append(self._decode_run(run))
                run = []
            pieces.append(text)
        if run:
            pieces.append(self._decode_run(run))
        return " ".join(pieces)

    def _decode_run(self, run: list[int]) -> str:
        return self._run_decoder.decode(run, skip_special_tokens=False)
