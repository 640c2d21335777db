"""What every attention backend receives: per-step metadata over a flattened token batch.

Token layout of one step (no padding):

    [ d0 d1 ... d(Bd-1) | p0 p0 p0 p0 | p1 p1 | ... ]
      decode rows: one       prefill / chunked-prefill sequences,
      token per sequence     each a contiguous run of query tokens

Paged KV cache, one tensor per layer: kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim]
(K at [0], V at [1]). The token at position p of a sequence lives in flat slot

    block_table[p // block_size] * block_size + p % block_size

Per-layer options every backend honours (None: plain causal attention, no extra work):

    sliding_window W   a query at position p sees keys at positions k with k <= p and
                       p - k < W, i.e. the W most recent tokens, itself included (transformers'
                       sliding_window_overlay: `kv_idx > q_idx - sliding_window`)
    soft_cap C         scores = C * tanh((q . k * scale) / C), before masking and softmax
                       (Gemma 2's attn_logit_softcapping)
    sinks [num_heads]  a learned logit per head that joins the softmax denominator as
                       exp(sink - max) and gets no value row (GPT-OSS); torch code only

With a window, the cache blocks that hold only positions < p - W + 1 of every query are
never read by the native kernels or by flash-attn (the torch path reads them and masks them
out), so their table entries only need to be valid block ids.
"""
from __future__ import annotations

import math
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
    # Rows [0, num_decode_tokens) are single-token decode rows: one per sequence, or a run of
    # consecutive rows for a sequence verifying draft tokens (engine.runner.input_prep).
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


def check_attention_options(sliding_window: int | None, soft_cap: float | None) -> None:
    """Raises ValueError naming the option when it is neither None nor positive."""
    if sliding_window is not None:
        # bool is an int; a window of True tokens is a caller's mistake.
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
            raise ValueError(f"sliding_window must be an int or None, got {sliding_window!r}")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 token, got {sliding_window}")
    if soft_cap is not None:
        if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)):
            raise ValueError(f"soft_cap must be a float or None, got {soft_cap!r}")
        if not 0.0 < soft_cap < math.inf:
            raise ValueError(f"soft_cap must be positive and finite, got {soft_cap}")


class AttentionBackend(Protocol):
    """Writes the step's new K/V into the paged cache, then attends over each sequence's
    context. query [T, num_heads, head_dim], key/value [T, num_kv_heads, head_dim]; returns
    [T, num_heads, head_dim] in the query's dtype. `sliding_window` and `soft_cap` are the
    layer's options (module docstring); a backend raises ValueError for invalid ones."""

    name: str

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor: ...
