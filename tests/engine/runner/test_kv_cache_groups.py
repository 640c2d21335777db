"""KV cache groups read from real transformers configs: layers grouped by the attention type
transformers gives each of them (`config.layer_types`, or one window for all), groups of
equal size sharing the cache's slot tensors, and the blocks a full-length request holds."""
from __future__ import annotations

import pytest
import torch
from family_configs import TEST_WINDOW, family_config
from transformers import Gemma3TextConfig, Qwen2Config

from engine.kv_cache.groups import kv_cache_groups
from engine.models.decoder_spec import read_decoder_spec
from engine.runner.kv_memory import KVCacheSpec

SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)


def configs() -> dict[str, object]:
    return {
        "gemma2": family_config("gemma2", **SIZES, num_hidden_layers=4),
        # Gemma 3's own default pattern: 5 local layers, then a global one.
        "gemma3_5to1": Gemma3TextConfig(**SIZES, num_hidden_layers=12, head_dim=32,
                                         sliding_window=TEST_WINDOW),
        # Qwen2: layers from max_window_layers on use the window.
        "qwen2_max_window_layers": Qwen2Config(
            **SIZES, num_hidden_layers=6, use_sliding_window=True, sliding_window=TEST_WINDOW,
            max_window_layers=2,
        ),
    }


@pytest.mark.parametrize("name", ["gemma2", "gemma3_5to1", "qwen2_max_window_layers"])
def test_hybrid_layers_are_grouped_by_their_attention_type(name: str) -> None:
    config = configs()[name]
    spec = read_decoder_spec(config)
    groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
    types = config.layer_types
    full_layers = [i for i, kind in enumerate(types) if kind == "full_attention"]
    sliding_layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    assert full_layers and sliding_layers
    # Every layer in exactly one group, each group of one attention type, full ones first.
    assert sorted(i for layers in groups.layers for i in layers) == list(range(len(types)))
    for window, layers in zip(groups.windows, groups.layers, strict=True):
        kinds = {types[i] for i in layers}
        assert kinds == {"full_attention" if window is None else "sliding_attention"}
        assert window in (None, config.sliding_window)
    assert groups.windows[0] is None
    # Groups as large as the rarer type: a block is one page of that many layers.
    size = min(len(full_layers), len(sliding_layers))
    assert groups.num_slots == size
    assert groups.num_groups == -(-len(full_layers) // size) + -(-len(sliding_layers) // size)
    # Layers of one group use distinct slots; each slot serves one layer of every group.
    slots = groups.layer_slots(list(range(size)))
    for layers in groups.layers:
        assert sorted(slots[i] for i in layers) == list(range(len(layers)))
    # Each layer reads the metadata of a group of its own attention type.
    for i, group in enumerate(groups.layer_group):
        assert (groups.windows[group] is None) == (types[i] == "full_attention")


@pytest.mark.parametrize(("family", "window"), [("mistral_window", TEST_WINDOW),
                                               ("llama", None), ("mistral", None)])
def test_uniform_models_are_one_group_of_every_layer(family: str, window: int | None) -> None:
    spec = read_decoder_spec(family_config(family, **SIZES, num_hidden_layers=3))
    groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
    assert groups.windows == (window,)
    assert groups.layers == ((0, 1, 2),)
    # One cache tensor per layer, as without groups.
    assert groups.num_slots == 3
    assert groups.layer_slots(["a", "b", "c"]) == ["a", "b", "c"]


def test_blocks_per_request_count_the_window_only_once_past_it() -> None:
    gemma2 = configs()["gemma2"]
    spec = read_decoder_spec(gemma2)
    groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
    kv_spec = KVCacheSpec(num_layers=groups.num_slots, num_kv_heads=2, head_dim=32,
                          block_size=4, dtype=torch.float32, group_windows=groups.windows)
    # Two layers per block (one of each group's), 4 tokens, K and V, float32.
    assert kv_spec.bytes_per_block == 2 * 2 * 4 * 2 * 32 * 4
    # Full group: every block; windowed: at most the 7 earlier positions' and the newest's.
    assert kv_spec.blocks_per_sequence(4) == 1 + 1
    assert kv_spec.blocks_per_sequence(100) == 25 + 3
    assert kv_spec.blocks_per_sequence(1000) == 250 + 3
