"""The decode-step floor of benchmarks/roofline.py against hand-computed values."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# benchmarks/ is not an installed package: import it from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.roofline import DecodeShape, decode_step_floor  # noqa: E402


def shape(tied: bool) -> DecodeShape:
    return DecodeShape(num_layers=2, num_kv_heads=2, head_dim=4, hidden_size=8, vocab_size=10,
                       tie_word_embeddings=tied, num_parameters=1000)


def test_untied_floor_counts_lm_head_but_not_input_embedding() -> None:
    # Streamed: 1000 - 10 * 8 = 920 params. KV per token: K and V x 2 layers x 2 heads x 4 dims
    # x 2 bytes = 64. Bytes: 920 * 2 + 3 seqs * 5 tokens * 64 = 1840 + 960 = 2800.
    floor = decode_step_floor(shape(tied=False), batch=3, context_len=5, dtype_bytes=2,
                              bandwidth_bytes_per_s=1400.0, flops_per_s=1380.0)
    assert floor.bytes_per_step == 2800
    assert floor.bandwidth_s == pytest.approx(2.0)
    assert floor.compute_s == pytest.approx(2 * 920 * 3 / 1380.0)  # 4.0 s: compute-bound
    assert floor.floor_s == pytest.approx(4.0)


def test_tied_embedding_is_streamed_once_as_the_lm_head() -> None:
    # All 1000 params streamed; batch 1, context 10: 2000 + 640 bytes at 2640 B/s = 1 s.
    floor = decode_step_floor(shape(tied=True), batch=1, context_len=10, dtype_bytes=2,
                              bandwidth_bytes_per_s=2640.0, flops_per_s=1e9)
    assert floor.bytes_per_step == 2640
    assert floor.floor_s == pytest.approx(1.0)
