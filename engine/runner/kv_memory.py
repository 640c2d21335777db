"""KV cache sizing and allocation.

One tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K at [0], V at [1]);
an int8 cache has head_dim + 4 bytes per row (engine/attention/kv_quant.py). With several KV
cache groups (engine/kv_cache/groups.py) one tensor per slot instead, each shared by one layer
of every group: a block is then one page of a group's layers, not of all layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention.kv_quant import cache_row_size
from engine.config import CacheConfig
from engine.kv_cache.groups import blocks_per_request

logger = logging.getLogger(__name__)

_CPU_DEFAULT_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int  # cache tensors: the layers, or the slots of the KV cache groups
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the model's: what attention computes in
    quantized: bool = False  # --kv-cache-dtype int8
    # The window of each KV cache group (None: full attention), for the blocks a request holds.
    group_windows: tuple[int | None, ...] = (None,)

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.int8 if self.quantized else self.dtype

    @property
    def row_size(self) -> int:
        return cache_row_size(self.head_dim, self.quantized)

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.cache_dtype).element_size()
        per_layer = 2 * self.block_size * self.num_kv_heads * self.row_size * element_size
        return self.num_layers * per_layer

    def blocks_per_sequence(self, num_tokens: int) -> int:
        """The most blocks a request of `num_tokens` holds at once, over every group (its
        windowed groups' blocks stop growing past the window)."""
        return blocks_per_request(self.group_windows, num_tokens, self.block_size)


def needs_memory_profile(cache_config: CacheConfig, device: torch.device) -> bool:
    """Whether the KV cache is sized from --gpu-memory-utilization (CUDA, no explicit size)."""
    explicit = cache_config.num_blocks is not None or cache_config.kv_cache_memory is not None
    return device.type == "cuda" and not explicit


def determine_num_blocks(
    spec: KVCacheSpec,
    cache_config: CacheConfig,
    *,
    device: torch.device,
    max_model_len: int,
    max_num_seqs: int,
    profiled_budget_bytes: int | None = None,
) -> int:
    """`cache_config.num_blocks` wins, then `kv_cache_memory` bytes; otherwise on CPU enough
    for max_num_seqs full-length sequences capped at 4 GiB, on CUDA the budget the profiling
    pass left (runner/memory_profile.py)."""
    if cache_config.num_blocks is not None:
        num_blocks = cache_config.num_blocks
    elif cache_config.kv_cache_memory is not None:
        num_blocks = cache_config.kv_cache_memory // spec.bytes_per_block
    elif device.type == "cuda":
        if profiled_budget_bytes is None:
            raise ValueError("CUDA KV sizing by gpu_memory_utilization needs the memory profile")
        num_blocks = profiled_budget_bytes // spec.bytes_per_block
    else:
        needed = max_num_seqs * spec.blocks_per_sequence(max_model_len)
        num_blocks = min(needed, _CPU_DEFAULT_BYTES // spec.bytes_per_block)
    if num_blocks < 1:
        raise ValueError(
            f"KV cache too small: {spec.bytes_per_block} bytes per block of {spec.block_size} "
            f"tokens do not fit the configured memory"
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB); maximum concurrency for %d "
        "tokens per request: %.2fx",
        num_blocks,
        spec.block_size,
        num_blocks * spec.block_size,
        num_blocks * spec.bytes_per_block / 2**20,
        max_model_len,
        max_concurrency(spec, num_blocks, max_model_len),
    )
    return num_blocks


def max_concurrency(spec: KVCacheSpec, num_blocks: int, max_model_len: int) -> float:
    """As vLLM words it: how many requests of the full model length fit in the cache at once
    (windowed groups count only the blocks of their window; the null block a window needs
    is not available to requests)."""
    windowed = any(window is not None for window in spec.group_windows)
    usable = num_blocks - 1 if windowed else num_blocks
    return usable / spec.blocks_per_sequence(max_model_len)


def allocate_kv_caches(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[torch.Tensor]:
    """Zero-filled: attention multiplies masked (never written) slots by probability 0, and
    0 * NaN from uninitialised memory would poison the output."""
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.row_size)
    return [torch.zeros(shape, dtype=spec.cache_dtype, device=device)
            for _ in range(spec.num_layers)]
