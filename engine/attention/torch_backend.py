"""Pure-torch paged attention: the reference backend, used on CPU and usable on CUDA.

Decode rows use a grouped matmul + float32 softmax over gathered blocks (torch SDPA is several
times slower for one-query attention on CPU); prefill runs use SDPA, which is compute-bound and
fast there. With a sliding window or a soft-cap (backend.py) decode gathers only the blocks
of each row's window and caps its scores; prefill builds the window mask for SDPA, or computes
capped scores explicitly with a float32 softmax (SDPA cannot cap). Attention sinks (a
learned logit per head in the softmax denominator, GPT-OSS) take the explicit-scores path too.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from engine.attention.backend import AttentionMetadata, PrefillSequence, check_attention_options
from engine.attention.kv_quant import kv_heads_and_dim, read_blocks, write_rows


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
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if sliding_window is not None or soft_cap is not None:
            check_attention_options(sliding_window, soft_cap)
        if sinks is not None:
            check_sinks(sinks, query.shape[1])
        write_kv(key, value, kv_cache, metadata.slot_mapping)
        # Parts in row order: the decode rows, then each prefill run.
        parts: list[torch.Tensor] = []
        num_decode_tokens = metadata.num_decode_tokens
        if num_decode_tokens:
            parts.append(decode_attention(
                query[:num_decode_tokens], kv_cache, metadata, scale,
                sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
            ))
        for prefill in metadata.prefills:
            rows = slice(prefill.query_start, prefill.query_start + prefill.num_query_tokens)
            parts.append(prefill_attention(
                query[rows], key[rows], value[rows], kv_cache, prefill, scale,
                sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
            ))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's K/V [T, num_kv_heads, head_dim] at their flat slots (quantized for an
    int8 cache); this must happen before attention reads, since every token attends to
    itself."""
    write_rows(kv_cache[0], slot_mapping, key)
    write_rows(kv_cache[1], slot_mapping, value)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """cache [num_blocks, block_size, H, R], block_ids [...] -> [..., block_size, H, D]; an
    int8 cache's rows come back dequantized to `dtype` (kv_quant.read_blocks)."""
    return read_blocks(cache, block_ids, dtype)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [Bd, num_heads, D] -> [Bd, num_heads, D], one query per sequence.

    Shapes: q [Bd, kv_heads, group, D] x K^T [Bd, kv_heads, D, L] -> scores [Bd, kv_heads,
    group, L], where L = max_blocks * block_size; positions >= context_len get -inf. With a
    window narrower than the table, L covers only the blocks of each row's window."""
    assert metadata.decode_block_tables is not None and metadata.decode_context_lens is not None
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[-2]
    dtype = query.dtype
    tables = metadata.decode_block_tables
    context_lens = metadata.decode_context_lens
    key_start = None
    if sliding_window is not None and sliding_window < tables.shape[1] * metadata.block_size:
        tables, key_start = window_block_tables(
            tables, context_lens, metadata.block_size, sliding_window
        )
    max_len = tables.shape[1] * metadata.block_size
    # [Bd, L, kv_heads, D] -> [Bd, kv_heads, L, D]; contiguous so that the batched matmuls
    # read K and V row-major (strided operands make the CPU matmul several times slower).
    keys = gather_blocks(kv_cache[0], tables, dtype).view(num_seqs, max_len, num_kv_heads, head_dim)
    values = gather_blocks(kv_cache[1], tables, dtype).view(
        num_seqs, max_len, num_kv_heads, head_dim)
    keys = keys.transpose(1, 2).contiguous()
    values = values.transpose(1, 2).contiguous()
    grouped_query = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped_query, keys.transpose(-1, -2)).float()
    if sliding_window is None:
        mask = metadata.decode_mask
        if mask is None:
            mask = decode_mask(context_lens, max_len)
    else:
        mask = decode_mask(context_lens, max_len, sliding_window, key_start)
    scores.mul_(scale)
    if soft_cap is not None:
        # Gemma 2's order: (q.k * scale) / C, tanh, * C.
        scores.div_(soft_cap).tanh_().mul_(soft_cap)
    scores.add_(mask)
    head_sinks = None if sinks is None else sinks.view(1, num_kv_heads, -1, 1)
    probs = softmax_with_sinks(scores, head_sinks).to(query.dtype)
    return torch.matmul(probs, values).view(num_seqs, num_heads, head_dim)


def window_block_tables(
    tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, sliding_window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of `tables` [Bd, max_blocks] that hold each row's window, and each row's
    first key position (a multiple of block_size).

    The window of a row is positions [len - W, len - 1]; W consecutive positions touch at most
    n = (W - 2) // block_size + 2 blocks. Each row takes n columns from the window's first
    block; columns past the table repeat its last one, at positions >= len (masked), so no
    block before the window is read."""
    num_blocks = min(tables.shape[1], (sliding_window + block_size - 2) // block_size + 1)
    first = torch.div((context_lens - sliding_window).clamp(min=0), block_size,
                      rounding_mode="floor")
    columns = first[:, None] + torch.arange(num_blocks, device=tables.device)
    return tables.gather(1, columns.clamp(max=tables.shape[1] - 1)), first * block_size


def decode_mask(
    context_lens: torch.Tensor,
    max_len: int,
    sliding_window: int | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """[Bd, 1, 1, max_len] float32: 0 for visible keys, -inf for the others. Key j of row b
    sits at position key_start[b] + j (j without key_start); the query at position
    context_lens[b] - 1 sees positions < context_lens[b], and with a window W only those
    > context_lens[b] - 1 - W."""
    key_positions = torch.arange(max_len, device=context_lens.device)[None, :]
    if key_start is not None:
        key_positions = key_start[:, None] + key_positions
    lens = context_lens[:, None]
    hidden = key_positions >= lens
    if sliding_window is not None:
        hidden |= key_positions <= lens - 1 - sliding_window
    mask = torch.zeros(
        (context_lens.shape[0], max_len), dtype=torch.float32, device=context_lens.device
    )
    mask.masked_fill_(hidden, float("-inf"))
    return mask.view(-1, 1, 1, max_len)


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    prefill: PrefillSequence,
    scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [Tq, num_heads, D] of one sequence -> [Tq, num_heads, D]."""
    if sliding_window is not None and sliding_window >= prefill.context_len:
        sliding_window = None  # the window holds the whole context: plain causal
    if sliding_window is not None or soft_cap is not None or sinks is not None:
        return _windowed_prefill(
            query, key, value, kv_cache, prefill, scale, sliding_window, soft_cap, sinks
        )
    if prefill.context_start == 0:
        # Nothing cached: the fresh K/V are the whole context.
        context_keys, context_values = key, value
        attn_mask = None
    else:
        num_kv_heads, head_dim = kv_heads_and_dim(kv_cache)
        context_len = prefill.context_len
        context_keys = gather_blocks(kv_cache[0], prefill.block_table, query.dtype)
        context_values = gather_blocks(kv_cache[1], prefill.block_table, query.dtype)
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


def _windowed_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    prefill: PrefillSequence,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    if prefill.context_start == 0:
        return masked_attention(query, key, value, 0, 0, scale, sliding_window, soft_cap, sinks)
    return cached_prefill_attention(
        query, kv_cache, prefill.block_table, prefill.context_start, scale, sliding_window,
        soft_cap, sinks,
    )


def cached_prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_start: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query rows at positions [context_start, context_start + Tq) over keys read from the
    cache (their own included): only the blocks from the first row's window start on."""
    block_size = kv_cache.shape[2]
    num_kv_heads, head_dim = kv_heads_and_dim(kv_cache)
    context_len = context_start + query.shape[0]
    first_key = 0
    if sliding_window is not None:
        first_key = max(0, context_start - sliding_window + 1)
    first_block = first_key // block_size
    blocks = block_table[first_block : -(-context_len // block_size)]
    num_keys = context_len - first_block * block_size
    keys = gather_blocks(kv_cache[0], blocks, query.dtype).view(-1, num_kv_heads, head_dim)
    values = gather_blocks(kv_cache[1], blocks, query.dtype).view(-1, num_kv_heads, head_dim)
    keys, values = keys[:num_keys], values[:num_keys]
    return masked_attention(
        query, keys, values, context_start, first_block * block_size, scale, sliding_window,
        soft_cap, sinks,
    )


# Most float32 scores one capped chunk holds (256 MiB): long prompts go a few query rows at
# a time instead of materialising [heads, Tq, L] at once.
_MAX_CHUNK_SCORES = 64 * 1024 * 1024


def masked_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_start: int,
    key_start: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [Tq, H, D] at positions query_start + i over keys/values [L, kv_heads, D] at
    positions key_start + j: key j is visible to query i iff k <= p and p - k < W.

    Without a cap SDPA takes the boolean mask (every query sees itself, so no row is empty);
    with one the scores are computed here: q.k in the input dtype, then float32 for the
    cap, the mask and the softmax, as the decode path does."""
    num_queries, num_heads, head_dim = query.shape
    num_keys, num_kv_heads = keys.shape[:2]
    query_positions = torch.arange(num_queries, device=query.device)[:, None] + query_start
    key_positions = torch.arange(num_keys, device=query.device)[None, :] + key_start
    visible = key_positions <= query_positions
    if sliding_window is not None:
        visible &= key_positions > query_positions - sliding_window
    if soft_cap is None and sinks is None:
        output = F.scaled_dot_product_attention(
            query.transpose(0, 1).unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        )
        return output.squeeze(0).transpose(0, 1)
    group = num_heads // num_kv_heads
    keys_t = keys.permute(1, 2, 0).unsqueeze(1)  # [kv_heads, 1, D, L]
    values_h = values.transpose(0, 1).unsqueeze(1)  # [kv_heads, 1, L, D]
    out = torch.empty_like(query)
    head_sinks = None if sinks is None else sinks.view(num_kv_heads, group, 1, 1)
    rows = max(1, _MAX_CHUNK_SCORES // (num_heads * num_keys))
    for first in range(0, num_queries, rows):
        chunk = query[first : first + rows]
        count = chunk.shape[0]
        grouped = chunk.reshape(count, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(grouped, keys_t).float()  # [kv_heads, group, count, L]
        scores.mul_(scale)
        if soft_cap is not None:
            scores.div_(soft_cap).tanh_().mul_(soft_cap)
        scores.masked_fill_(~visible[first : first + count], float("-inf"))
        probs = softmax_with_sinks(scores, head_sinks).to(query.dtype)
        output = torch.matmul(probs, values_h)  # [kv_heads, group, count, D]
        out[first : first + count] = output.permute(2, 0, 1, 3).reshape(count, num_heads, head_dim)
    return out


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Float32 softmax over the last dim of `scores`; `sinks` (already viewed to broadcast
    against scores[..., :1]) joins each row's denominator as exp(sink - max), then is dropped."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink_column = sinks.float().expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1)[..., :-1]


def check_sinks(sinks: torch.Tensor, num_heads: int) -> None:
    """Raises ValueError unless sinks holds one logit per query head."""
    if sinks.dim() != 1 or sinks.shape[0] != num_heads:
        raise ValueError(f"sinks must hold one logit per head ({num_heads}), "
                         f"got shape {tuple(sinks.shape)}")
