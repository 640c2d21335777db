"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the
sequence's own suffix (no draft model).

    tokens:  ... a b c d e ... x y  a b c      suffix "a b c" (n = 3) occurred before at i
                   ^i    ^i+n                  -> propose tokens[i+n : i+n+k] = "d e ..."

The longest suffix (prompt_lookup_max down to prompt_lookup_min) with an earlier occurrence
wins; among its occurrences the latest, whose continuation is the most recent evidence.

A continuation that runs into the end of the sequence goes on with the proposal itself: the
match says token j comes p = length - start tokens after its model, and for the last p tokens
that model is a proposed one. So a loop of period p proposes all k tokens, not just p:

    tokens:  ... x y x y x y      suffix "x y x" latest at start = length - 2
    proposal:    x y x y          (not just "x y": the earlier proposal's tokens repeat)

(Text that repeats with a short period, e.g. a list or a model stuck in a loop, otherwise
verifies one or two drafts per step with k = 4.)

Cost: each request keeps its tokens in a growing numpy buffer (only new tokens are copied in),
and one lookup is one vectorised comparison over the buffer plus work on the places where the
newest token occurred before (~7 us for 4096 tokens of text that does not repeat); no
per-token Python work.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _TokenBuffer:
    __slots__ = ("array", "length")

    def __init__(self, capacity: int) -> None:
        self.array = np.empty(max(capacity, 64), dtype=np.int64)
        self.length = 0

    def sync(self, token_ids: Sequence[int]) -> np.ndarray:
        """The buffer holding exactly `token_ids` (a request's tokens only ever grow)."""
        total = len(token_ids)
        if total < self.length:  # not expected: a request's tokens never shrink
            self.length = 0
        if total > self.array.shape[0]:
            grown = np.empty(max(total, 2 * self.array.shape[0]), dtype=np.int64)
            grown[: self.length] = self.array[: self.length]
            self.array = grown
        if total > self.length:
            self.array[self.length : total] = token_ids[self.length : total]
            self.length = total
        return self.array[:total]


def find_ngram_continuation(
    tokens: np.ndarray, num_tokens: int, max_n: int, min_n: int
) -> list[int]:
    """`num_tokens` tokens following the latest earlier occurrence of the longest suffix of
    `tokens` of length in [min_n, max_n], continued periodically past the sequence's end (see
    the top); [] when none occurs.

    One pass over the sequence finds where the newest token occurred before (an occurrence
    ending at e < length - 1 leaves a continuation); the longer suffixes are then checked on
    those few candidates only, so text that does not repeat costs one vectorised compare."""
    length = tokens.shape[0]
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
    if ends.size == 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        candidates = ends[ends >= n - 1]
        for j in range(1, n):
            if not candidates.size:
                break
            candidates = candidates[tokens[candidates - j] == tokens[length - 1 - j]]
        if candidates.size:
            start = int(candidates[-1]) + 1
            # np.resize repeats the run [start, length) cyclically: the periodic continuation.
            return np.resize(tokens[start : start + num_tokens], num_tokens).tolist()
    return []


class NgramProposer:
    def __init__(self, max_n: int, min_n: int) -> None:
        self.max_n = max_n
        self.min_n = min_n
        self._buffers: dict[str, _TokenBuffer] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        buffer = self._buffers.get(request_id)
        if buffer is None:
            buffer = self._buffers[request_id] = _TokenBuffer(2 * len(token_ids))
        tokens = buffer.sync(token_ids)
        return find_ngram_continuation(tokens, num_tokens, self.max_n, self.min_n)

    def forget(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)
