"""Which window the KV cache may free blocks behind, read from real transformers configs:
only a model windowed on every layer has one (the largest of its windows)."""
from __future__ import annotations

import pytest
from family_configs import TEST_WINDOW, family_config

from engine.models.decoder_spec import read_decoder_spec
from engine.runner.model_runner import kv_sliding_window

SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("mistral_window", TEST_WINDOW),  # every layer windowed
        ("mistral", None),
        ("llama", None),
        ("gemma2", None),  # windowed and full layers alternate: every block stays needed
        ("gemma3", None),
    ],
)
def test_window_of_each_family(family: str, expected: int | None) -> None:
    spec = read_decoder_spec(family_config(family, **SIZES))
    assert len(spec.layer_windows) == 4
    assert kv_sliding_window(spec.layer_windows) == expected


def test_the_largest_window_counts_and_one_full_layer_keeps_everything() -> None:
    assert kv_sliding_window((8, 16, 8)) == 16
    assert kv_sliding_window((8, None, 8)) is None
    assert kv_sliding_window(()) is None
