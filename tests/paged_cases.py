"""Random paged-cache fixtures and pure-torch references for the kernel tests.

Every case draws fresh random data (never zeros) from a generator whose seed is printed, so
a failure can be replayed with `PAGED_CASE_SEED=<seed>`.

Sliding windows and soft-caps are checked against `dense_attention`, an explicit reference
written here (dense scores, mask k <= p and p - k < W, C * tanh(s / C), float32 softmax), not
against the engine's torch backend.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.attention.torch_backend import decode_attention, gather_blocks, prefill_attention

# bf16 keeps 8 significant bits: outputs of magnitude ~1-3 round by up to ~1e-2.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2e-2},
}


def fresh_generator() -> torch.Generator:
    seed = int(os.environ.get("PAGED_CASE_SEED", random.SystemRandom().randrange(2**31)))
    print(f"PAGED_CASE_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class PagedCase:
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, short rows padded with a valid id
    context_lens: torch.Tensor  # [num_seqs] int64

    @property
    def block_size(self) -> int:
        return self.kv_cache.shape[2]


def make_paged_case(
    gen: torch.Generator,
    dtype: torch.dtype,
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> PagedCase:
    """Each sequence gets its own blocks, drawn from a shuffled pool with spare blocks."""
    blocks_needed = [math.ceil(length / block_size) for length in context_lens]
    num_blocks = sum(blocks_needed) + 3
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.randn(shape, generator=gen).to(dtype)
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.empty(len(context_lens), max(blocks_needed), dtype=torch.int64)
    start = 0
    for row, count in enumerate(blocks_needed):
        tables[row, :count] = pool[start : start + count]
        tables[row, count:] = pool[-1]  # padding: a valid id that is never read
        start += count
    return PagedCase(kv_cache, tables, torch.tensor(context_lens, dtype=torch.int64))


def reference_decode(case: PagedCase, query: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch backend's decode path, in float32 on the same (upcast) inputs."""
    num_seqs = query.shape[0]
    positions = torch.arange(case.block_tables.shape[1] * case.block_size)
    mask = torch.zeros(num_seqs, positions.numel())
    mask.masked_fill_(positions[None, :] >= case.context_lens[:, None], float("-inf"))
    metadata = AttentionMetadata(
        block_size=case.block_size,
        slot_mapping=torch.empty(0, dtype=torch.int64),
        num_decode_tokens=num_seqs,
        decode_block_tables=case.block_tables,
        decode_context_lens=case.context_lens,
        decode_mask=mask.view(num_seqs, 1, 1, -1),
        prefills=(),
    )
    return decode_attention(query.float(), case.kv_cache.float(), metadata, scale)


def reference_prefill(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query: torch.Tensor,
    context_start: int,
    scale: float,
) -> torch.Tensor:
    """The torch backend's prefill path (gather + SDPA) in float32; the chunk's own K/V are
    read back from the cache, where the step wrote them."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    context_len = context_start + query.shape[0]
    cache = kv_cache.float()
    context_mask = None
    if context_start > 0:
        positions = torch.arange(context_len)
        context_mask = positions[None, :] <= positions[context_start:, None]
    prefill = PrefillSequence(
        query_start=0,
        num_query_tokens=query.shape[0],
        context_start=context_start,
        block_table=block_table,
        context_mask=context_mask,
    )
    fresh_keys = gather_blocks(cache[0], block_table).view(-1, num_kv_heads, head_dim)
    fresh_values = gather_blocks(cache[1], block_table).view(-1, num_kv_heads, head_dim)
    return prefill_attention(
        query.float(),
        fresh_keys[context_start:context_len],
        fresh_values[context_start:context_len],
        cache,
        prefill,
        scale,
    )


def strided_rows(
    gen: torch.Generator, num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """[num_tokens, num_heads, head_dim] as a non-contiguous view (rows of a wider tensor),
    the way q/k/v come out of a fused projection."""
    wide = torch.randn(num_tokens, num_heads + 3, head_dim, generator=gen).to(dtype)
    return wide[:, 1 : num_heads + 1]


# (window, soft_cap, group, head_dim) of the window/cap kernel cases; the window is a kind,
# sized per block size by `window_tokens`. Group and head size rotate through the cases.
WINDOW_CAP_CASES = [
    pytest.param("small", None, 4, 64, id="window-inside-a-block"),
    pytest.param("span", 2.5, 2, 128, id="window-spans-blocks-capped"),
    pytest.param("parts", None, 8, 128, id="window-spans-partitions"),
    pytest.param("wide", 50.0, 1, 64, id="window-wider-than-context-capped"),
    pytest.param(None, 2.5, 4, 128, id="capped"),
]


def window_tokens(kind: str | None, block_size: int) -> int | None:
    """small: under half a block; span: a few blocks; parts: across the 256-token decode
    partitions; wide: more than any context here."""
    sizes = {"small": block_size // 2 - 1, "span": 2 * block_size + 5, "parts": 300,
             "wide": 5000}
    return None if kind is None else sizes[kind]


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """query [Tq, H, D] at `query_positions` over keys/values [L, kv_heads, D] at positions
    0 .. L-1, all in float32: key k is visible to the query at p iff k <= p and p - k < W;
    scores are C * tanh(scale q.k / C) with a cap."""
    group = query.shape[1] // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    key_positions = torch.arange(keys.shape[0], device=query.device)[None, :]
    positions = query_positions[:, None]
    visible = key_positions <= positions
    if sliding_window is not None:
        visible &= positions - key_positions < sliding_window
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values)


def sequence_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V [length, kv_heads, D] in position order, read through its table."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    keys = kv_cache[0, block_table.long()].reshape(-1, num_kv_heads, head_dim)[:length]
    values = kv_cache[1, block_table.long()].reshape(-1, num_kv_heads, head_dim)[:length]
    return keys, values


def dense_decode(
    case: PagedCase,
    query: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    rows = []
    for row, length in enumerate(case.context_lens.tolist()):
        keys, values = sequence_kv(case.kv_cache, case.block_tables[row], length)
        position = torch.tensor([length - 1])
        rows.append(dense_attention(query[row : row + 1], keys, values, position, scale,
                                    sliding_window, soft_cap))
    return torch.cat(rows)


def dense_prefill(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query: torch.Tensor,
    context_start: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    context_len = context_start + query.shape[0]
    keys, values = sequence_kv(kv_cache, block_table, context_len)
    positions = torch.arange(context_start, context_len)
    return dense_attention(query, keys, values, positions, scale, sliding_window, soft_cap)


def poison_before(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, first_positions: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache with one extra block full of NaN, and tables whose entries for the blocks wholly
    before row b's first_positions[b] point at it: attention that reads any of them (instead
    of skipping the blocks outside the window) returns NaN."""
    nan_block = torch.full_like(kv_cache[:, :1], float("nan"))
    poisoned = torch.cat([kv_cache, nan_block], dim=1)
    tables = block_tables.clone()
    for row, first in enumerate(first_positions):
        tables[row, : first // kv_cache.shape[2]] = kv_cache.shape[1]
    return poisoned, tables


def dense_step(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    """A whole step (decode rows, then each prefill run) by `dense_attention`, reading every
    sequence's K/V from `kv_cache`, where the step's new tokens are already written."""
    parts = []
    if metadata.num_decode_tokens:
        assert metadata.decode_block_tables is not None
        assert metadata.decode_context_lens is not None
        for row, length in enumerate(metadata.decode_context_lens.tolist()):
            keys, values = sequence_kv(kv_cache, metadata.decode_block_tables[row], length)
            parts.append(dense_attention(query[row : row + 1], keys, values,
                                         torch.tensor([length - 1]), scale, sliding_window,
                                         soft_cap))
    for prefill in metadata.prefills:
        rows = query[prefill.query_start : prefill.query_start + prefill.num_query_tokens]
        parts.append(dense_prefill(kv_cache, prefill.block_table, rows, prefill.context_start,
                                   scale, sliding_window, soft_cap))
    return torch.cat(parts)
