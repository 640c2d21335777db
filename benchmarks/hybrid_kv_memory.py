"""KV cache memory one request holds, for hybrid sliding-window models at their real shapes,
with KV cache groups (windowed layers keep only their window's blocks) against one block
table shared by every layer (each layer keeps every block).

The shapes come from transformers' own config classes with the published checkpoints'
sizes; no weights are built. The sizes are exact (the KV cache manager's bound on the blocks
a decoding request holds, engine/kv_cache/groups.py), so one run on any machine gives them:

    .venv/bin/python -m benchmarks.hybrid_kv_memory --lengths 4096 32768 --block-size 16
"""
from __future__ import annotations

import argparse

import torch
from transformers import Gemma2Config, Gemma3TextConfig, PretrainedConfig, Qwen2Config

from engine.kv_cache.groups import kv_cache_groups
from engine.models.decoder_spec import read_decoder_spec
from engine.runner.kv_memory import KVCacheSpec


def shapes() -> dict[str, PretrainedConfig]:
    return {
        # Gemma-2-9B: 42 layers alternating 4096-token windows and global attention.
        "gemma2-9b": Gemma2Config(
            hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=4096,
        ),
        # Gemma-3-27B: 62 layers, 5 local (1024-token window) to 1 global.
        "gemma3-27b": Gemma3TextConfig(
            hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
            num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=1024,
        ),
        # Qwen2-7B with its window switched on: layers from max_window_layers = 21 windowed.
        "qwen2-7b-window": Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, use_sliding_window=True,
            sliding_window=4096, max_window_layers=21,
        ),
    }


def request_bytes(config: PretrainedConfig, num_tokens: int, block_size: int,
                  grouped: bool) -> int:
    """Bytes of KV one request of `num_tokens` holds while it decodes (bf16 cache)."""
    spec = read_decoder_spec(config)
    if grouped:
        groups = kv_cache_groups(spec.layer_windows, spec.num_layers)
        num_slots, windows = groups.num_slots, groups.windows
    else:
        num_slots, windows = spec.num_layers, (None,)
    kv = KVCacheSpec(num_layers=num_slots, num_kv_heads=spec.num_kv_heads,
                     head_dim=spec.head_dim, block_size=block_size, dtype=torch.bfloat16,
                     group_windows=windows)
    return kv.blocks_per_sequence(num_tokens) * kv.bytes_per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768],
                        help="request lengths in tokens (default: 4096 32768)")
    parser.add_argument("--block-size", type=int, default=16,
                        help="tokens per KV block (default: 16)")
    args = parser.parse_args()
    print(f"{'shape':18} {'tokens':>7} {'one table':>10} {'groups':>10} {'ratio':>6}")
    for name, config in shapes().items():
        for length in args.lengths:
            shared = request_bytes(config, length, args.block_size, grouped=False)
            grouped = request_bytes(config, length, args.block_size, grouped=True)
            print(f"{name:18} {length:7d} {shared / 2**20:8.0f}Mi {grouped / 2**20:8.0f}Mi "
                  f"{shared / grouped:5.2f}x")


if __name__ == "__main__":
    main()
