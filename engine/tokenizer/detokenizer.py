"""Incremental detokenization: turn a growing list of output token ids into text deltas.

Decoding token by token is wrong for two reasons: a byte-level token may end in the middle of a
UTF-8 character, and some decoders (SentencePiece's leading-space rule, for one) render a token
differently depending on what precedes it. Decoding the whole output every step is right but
costs O(length). This decodes a small window instead:

    window:  [ ...prefix tokens... | ...unread tokens............ ]
             0                     read               end         len(window)

    prefix text = decode(window[:read])   text already emitted, kept as context
    text        = decode(window[:end])    for a candidate end > read
    delta       = text[len(prefix text):]

The text is emitted up to the last token boundary where it is non-empty and does not end in
U+FFFD (a replacement char at the tail usually means an incomplete multi-byte character that a
later token completes); tokens past that boundary stay unread. Emitted tokens become the new
prefix. Invariants:
  - `window[:read]` always decodes to text ending on a character boundary, so its decoding
    is a prefix of the decoding of anything appended to it (true for byte-level BPE);
  - hence the concatenation of every delta plus `flush()` equals `decode(all output ids)`.
"""
from __future__ import annotations

from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first output tokens.
PROMPT_CONTEXT_TOKENS = 5
# Unread tokens normally number at most 3 (an incomplete UTF-8 sequence is at most 3 bytes); a
# longer run means invalid bytes, or skipped special tokens inside a character. Past this bound
# the held text is released anyway, so each step stays O(window) even on degenerate output,
# at the price of exactness on such output.
MAX_HELD_TOKENS = 16


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request state; `step()` after each batch of new output tokens, `flush()` at the end."""

    def __init__(
        self,
        decoder: TokenDecoder,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._decoder = decoder
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt that ends mid-character cannot serve as context: its replacement char
        # would be counted as already emitted text.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._window: list[int] = context
        self._read = len(context)

    def step(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the text that became final (possibly "")."""
        if not new_token_ids:
            return ""
        self._window.extend(new_token_ids)
        prefix_text = self._decode(self._window[: self._read])
        # Ends inside the unread part were already tried by earlier steps: try the new ones,
        # the latest first, so one call releases as much as is final (at most
        # MAX_HELD_TOKENS + 1 tries: past that the whole window is released below).
        size = len(self._window)
        oldest_end = max(size - len(new_token_ids), self._read, size - MAX_HELD_TOKENS - 1) + 1
        for end in range(size, oldest_end - 1, -1):
            text = self._decode(self._window[:end])
            if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
                return self._advance(end, text[len(prefix_text) :])
        if size - self._read > MAX_HELD_TOKENS:
            return self._advance(len(self._window), self._decode(self._window)[len(prefix_text) :])
        return ""

    def flush(self) -> str:
        """Release whatever is still held (the request has ended)."""
        if self._read == len(self._window):
            return ""
        prefix_text = self._decode(self._window[: self._read])
        return self._advance(len(self._window), self._decode(self._window)[len(prefix_text) :])

    def _advance(self, end: int, delta: str) -> str:
        """Mark `window[:end]` emitted: its unread part becomes the new prefix."""
        old_read = self._read
        self._window = self._window[old_read:]
        self._read = end - old_read
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._decoder.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
