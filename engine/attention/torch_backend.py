"""Pure-torch paged attention: the reference backend, used on CPU and usable on CUDA.

Decode rows use a grouped matmul + float32 softmax over gathered blocks (torch SDPA is several
times slower for one-query attention on CPU); prefill runs use SDPA, which is compute-bound and
fast there.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from engine.attention.backend import AttentionMetadata, PrefillSequence


class TorchAttentionBackend:
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        # Parts in row order: the decode rows, then each prefill run.
        parts: list[torch.Tensor] = []
        num_decode_tokens = metadata.num_decode_tokens
        if num_decode_tokens:
            parts.append(decode_attention(query[:num_decode_tokens], kv_cache, metadata, scale))
        for prefill in metadata.prefills:
            rows = slice(prefill.query_start, prefill.query_start + prefill.num_query_tokens)
            parts.append(
                prefill_attention(query[rows], key[rows], value[rows], kv_cache, prefill, scale)
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's K/V [T, num_kv_heads, head_dim] at their flat slots; this must happen
    before attention reads, since every token attends to itself."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, H, D], block_ids [...] -> [..., block_size, H, D].

    Whole blocks are copied (contiguous runs of block_size * H * D elements), which is much
    faster than gathering slot by slot."""
    gathered = cache.index_select(0, block_ids.reshape(-1))
    return gathered.view(*block_ids.shape, *cache.shape[1:])


def decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
) -> torch.Tensor:
    """query [Bd, num_heads, D] -> [Bd, num_heads, D], one query per sequence.

    Shapes: q [Bd, kv_heads, group, D] x K^T [Bd, kv_heads, D, L] -> scores [Bd, kv_heads,
    group, L], where L = max_blocks * block_size; positions >= context_len get -inf."""
    assert metadata.decode_block_tables is not None and metadata.decode_context_lens is not None
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[-2]
    tables = metadata.decode_block_tables
    max_len = tables.shape[1] * metadata.block_size
    # [Bd, L, kv_heads, D] -> [Bd, kv_heads, L, D]; contiguous so that the batched matmuls
    # read K and V row-major (strided operands make the CPU matmul several times slower).
    keys = gather_blocks(kv_cache[0], tables).view(num_seqs, max_len, num_kv_heads, head_dim)
    values = gather_blocks(kv_cache[1], tables).view(num_seqs, max_len, num_kv_heads, head_dim)
    keys = keys.transpose(1, 2).contiguous()
    values = values.transpose(1, 2).contiguous()
    grouped_query = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2)).float()
    mask = metadata.decode_mask
    if mask is None:
        mask = decode_mask(metadata.decode_context_lens, max_len)
    scores.mul_(scale).add_(mask)
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    return torch.matmul(probs, values).view(num_seqs, num_heads, head_dim)


def decode_mask(context_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[Bd, 1, 1, max_len] float32: 0 for key positions < context_lens[b], -inf after them."""
    key_positions = torch.arange(max_len, device=context_lens.device)
    mask = torch.zeros(
        (context_lens.shape[0], max_len), dtype=torch.float32, device=context_lens.device
    )
    mask.masked_fill_(key_positions[None, :] >= context_lens[:, None], float("-inf"))
    return mask.view(-1, 1, 1, max_len)


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    prefill: PrefillSequence,
    scale: float,
) -> torch.Tensor:
    """query [Tq, num_heads, D] of one sequence -> [Tq, num_heads, D]."""
    if prefill.context_start == 0:
        # Nothing cached: the fresh K/V are the whole context.
        context_keys, context_values = key, value
        attn_mask = None
    else:
        num_kv_heads, head_dim = kv_cache.shape[-2:]
        context_len = prefill.context_len
        context_keys = gather_blocks(kv_cache[0], prefill.block_table)
        context_values = gather_blocks(kv_cache[1], prefill.block_table)
        context_keys = context_keys.view(-1, num_kv_heads, head_dim)[:context_len]
        context_values = context_values.view(-1, num_kv_heads, head_dim)[:context_len]
        attn_mask = prefill.context_mask
    output = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0),
        context_keys.transpose(0, 1).unsqueeze(0),
        context_values.transpose(0, 1).unsqueeze(0),
        attn_mask=attn_mask,
        is_causal=attn_mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return output.squeeze(0).transpose(0, 1)
