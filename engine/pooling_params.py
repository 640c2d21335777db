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
    """What the runner does to one pooled vector: keep the first `dimensions` values (all when
    None), then L2-normalise when `normalize`. Truncating before normalising is what
    Matryoshka-trained models expect."""

    normalize: bool = True
    dimensions: int | None = None
