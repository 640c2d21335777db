"""Random paged-cache fixtures and pure-torch references for the kernel tests.

Every case draws fresh random data (never zeros) from a generator whose seed is printed, so
a failure can be replayed with `PAGED_CASE_SEED=<seed>`.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

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
