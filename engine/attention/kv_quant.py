"""The int8 KV cache (`--kv-cache-dtype int8`): what one cache row holds and how it is read.

A bf16 cache is [2, num_blocks, block_size, num_kv_heads, head_dim]. The int8 cache keeps the
same shape with head_dim + 4 bytes per (token, kv head) row: the row's values quantized
symmetrically with one scale, then that float32 scale's 4 bytes:

    row (head_dim 128):  [ q_0 q_1 ... q_127 | s s s s ]     value_i = q_i * scale
                                               float32 scale = max|x_i| / 127

One scale per token and head (not per block) lets each new token be written alone, without
re-quantizing its neighbours; keeping it in the row means a kernel reads it with the values
and everything that handles cache tensors (block tables, copies, the prefix cache) is
unchanged. Per token, K/V bytes drop from 4 * head_dim to 2 * (head_dim + 4): 1.94x more
tokens in the same memory and half the bytes decode attention reads.

Rows never written hold zeros: scale 0.0, values 0, never NaN.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4


def is_quantized(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.int8


def cache_row_size(head_dim: int, quantized: bool) -> int:
    """Elements of one (token, kv head) row in the cache tensor."""
    return head_dim + SCALE_BYTES if quantized else head_dim


def kv_heads_and_dim(kv_cache: torch.Tensor) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of the values a cache holds."""
    num_kv_heads, row = kv_cache.shape[-2:]
    return num_kv_heads, row - SCALE_BYTES if is_quantized(kv_cache) else row


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float -> [..., head_dim + 4] int8 rows (values, then the scale)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    values = torch.where(scale > 0, x / scale, torch.zeros_like(x))
    quantized = values.round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([quantized, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., head_dim + 4] int8 rows -> [..., head_dim] in `dtype`."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)
    return (rows[..., :head_dim].float() * scale).to(dtype)


def write_rows(cache: torch.Tensor, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
    """x [T, num_kv_heads, head_dim] into one of K/V's caches [num_blocks, block_size, H, R]
    at flat slots `slot_mapping` [T] (all valid)."""
    num_kv_heads, row = cache.shape[-2:]
    rows = quantize_rows(x) if is_quantized(cache) else x
    cache.view(-1, num_kv_heads, row).index_copy_(0, slot_mapping, rows)


def read_blocks(cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [num_blocks, block_size, H, R], block_ids [...] -> [..., block_size, H, head_dim]
    in `dtype`. Whole blocks are copied (contiguous runs), much faster than slot by slot."""
    gathered = cache.index_select(0, block_ids.reshape(-1))
    gathered = gathered.view(*block_ids.shape, *cache.shape[1:])
    return dequantize_rows(gathered, dtype) if is_quantized(cache) else gathered
