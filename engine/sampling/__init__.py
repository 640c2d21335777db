"""Batched token sampling: a recipe of small transforms over [num_rows, vocab] logits."""
from __future__ import annotations

from engine.sampling.sampler import Sampler

__all__ = ["Sampler"]
