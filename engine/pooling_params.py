"""Per-request embedding parameters.

Plain data (no torch, no protobuf), importable from anywhere like sampling_params.py; the
embedding API types that carry them are in generation.py.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a sequence's final hidden states become one vector.
POOLING_TYPES = ("mean", "cls", "last")


@dataclass(frozen=True, slots=True)
class PoolingParams:
    """What the runner does to one pooled vector (a sequence classifier's logits row for
    classifier models): keep the first `dimensions` values (all when None), then
    L2-normalise when `normalize`. Truncating before normalising is what
    Matryoshka-trained models expect."""

    normalize: bool = True
    dimensions: int | None = None
    # A sentence pair tokenized as one sequence (cross-encoders): tokens from this index on
    # are the second segment (token type 1 for BERT). None: one segment.
    second_segment_start: int | None = None
