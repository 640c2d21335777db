"""What every attention backend receives: per-step metadata over a flattened token batch.

Token layout of one step (no padding):

    [ d0 d1 ... d(Bd-1) | p0 p0 p0 p0 | p1 p1 | ... ]
      decode rows: one       prefill / chunked-prefill sequences,
      token per sequence     each a contiguous run of query tokens

Paged KV cache, one tensor per layer: kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]
(K at [0], V at [1]). The token at position p of a sequence lives in flat slot

    block_table[p // block_size] * block_size + p % block_size
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class PrefillSequence:
    """One prefill (or chunk) of `num_query_tokens` tokens at positions
    [context_start, context_start + num_query_tokens) of its sequence."""

    query_start: int  # first row of this sequence in the flattened batch
    num_query_tokens: int
    # Tokens already in the cache before this chunk (a prefix-cache hit or earlier chunks).
    context_start: int
    # Blocks covering [0, context_len), int64 on the device.
    block_table: torch.Tensor
    # Only when context_start > 0: [num_query_tokens, context_len] bool, True = may attend
    # (causal, offset by context_start).
    context_mask: torch.Tensor | None

    @property
    def context_len(self) -> int:
        return self.context_start + self.num_query_tokens


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Built once per step by the runner and shared by every layer."""

    block_size: int
    # [T] int64: the flat cache slot each new token's K/V is written to (before attention).
    slot_mapping: torch.Tensor
    # Rows [0, num_decode_tokens) are single-token decode rows, one per sequence.
    num_decode_tokens: int
    # [Bd, max_blocks] int64; short rows are padded with a valid block id (masked out).
    decode_block_tables: torch.Tensor | None
    # [Bd] int64: context length including the new token.
    decode_context_lens: torch.Tensor | None
    # [Bd, 1, 1, max_blocks * block_size] float32: 0 where position < context_len, else -inf.
    # Only the torch backend reads it, and derives it from decode_context_lens when None (the
    # runner passes None: building it every step would cost the other backends host time).
    decode_mask: torch.Tensor | None
    prefills: tuple[PrefillSequence, ...]


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the paged cache, then attends over each sequence's
    context. query [T, num_heads, head_dim], key/value [T, num_kv_heads, head_dim]; returns
    [T, num_heads, head_dim] in the query's dtype."""

    name: str

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...
