"""flash_attn: FlashAttention-2 over our paged KV cache (CUDA only, fp16/bf16).

Imported only when this backend is chosen, so CPU installs never touch flash_attn.
flash-attn reads the cache in place: kv_cache[0] / kv_cache[1] are exactly its paged layout
[num_blocks, block_size, num_kv_heads, head_dim]; its block_table needs block_size % 256 == 0
(checked when the backend is chosen, engine.attention.resolve_attention_backend).

    decode rows   -> flash_attn_with_kvcache(q [Bd, 1, H, D], cache_seqlens, block_table)
    prefill runs  -> one flash_attn_varlen_func call for all runs, with block_table:
                     cu_seqlens_q = [0, q_0, q_0 + q_1, ...]   (query rows of each run)
                     cu_seqlens_k = [0, L_0, L_0 + L_1, ...]   (context_len of each run)
                     causal masks align bottom-right, so query i of a run at position
                     context_start + i sees keys [0, context_start + i]

A sliding window W is flash-attn's `window_size=(W - 1, 0)` (its left window counts the keys
before the query, so with the query itself W keys: p - k < W), a soft-cap C is `softcap=C`.

The per-step tensors (int32 tables and offsets) are built once per step and reused by every
layer. float32 models are served by our paged ops instead (flash-attn has no fp32 kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import ops
from engine.attention.backend import AttentionMetadata, check_attention_options
from engine.attention.cpu_backend import PagedOpsAttentionBackend


@dataclass(frozen=True)
class _StepTensors:
    decode_tables: torch.Tensor | None  # [Bd, max_blocks] int32
    decode_lens: torch.Tensor | None  # [Bd] int32
    prefill_tables: torch.Tensor | None  # [P, max_blocks] int32, rows padded with block 0
    cu_seqlens_q: torch.Tensor | None  # [P + 1] int32
    cu_seqlens_k: torch.Tensor | None  # [P + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int


class FlashAttentionBackend:
    name = "flash_attn"

    def __init__(self) -> None:
        try:
            from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        except ImportError as exc:
            raise RuntimeError(
                "attention backend flash_attn needs the flash-attn package on a CUDA machine "
                "(pip install 'protoserve[cuda]')"
            ) from exc
        self._varlen = flash_attn_varlen_func
        self._with_kvcache = flash_attn_with_kvcache
        self._fp32_backend = PagedOpsAttentionBackend("cuda_paged")
        # The metadata object the cached tensors belong to; holding it keeps its id unique.
        self._step: tuple[AttentionMetadata, _StepTensors] | None = None

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
        if sinks is not None:
            raise ValueError("attention backend flash_attn does not support attention sinks "
                             "(sinks); use --attention-backend torch or cuda_paged")
        if query.dtype == torch.float32:
            return self._fp32_backend.forward(
                query, key, value, kv_cache, metadata, scale,
                sliding_window=sliding_window, soft_cap=soft_cap,
            )
        options: dict[str, object] = {}
        if sliding_window is not None or soft_cap is not None:
            check_attention_options(sliding_window, soft_cap)
            options = _flash_options(sliding_window, soft_cap)
        ops.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        step = self._step_tensors(metadata)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        num_decode_tokens = metadata.num_decode_tokens
        if num_decode_tokens:
            decoded = self._with_kvcache(
                query[:num_decode_tokens].unsqueeze(1),
                kv_cache[0],
                kv_cache[1],
                cache_seqlens=step.decode_lens,
                block_table=step.decode_tables,
                softmax_scale=scale,
                causal=True,
                **options,
            )
            out[:num_decode_tokens] = decoded.squeeze(1)
        if metadata.prefills:
            out[num_decode_tokens:] = self._varlen(
                query[num_decode_tokens:],
                kv_cache[0],
                kv_cache[1],
                step.cu_seqlens_q,
                step.cu_seqlens_k,
                step.max_seqlen_q,
                step.max_seqlen_k,
                softmax_scale=scale,
                causal=True,
                block_table=step.prefill_tables,
                **options,
            )
        return out

    def _step_tensors(self, metadata: AttentionMetadata) -> _StepTensors:
        if self._step is not None and self._step[0] is metadata:
            return self._step[1]
        decode_tables = decode_lens = None
        if metadata.num_decode_tokens:
            assert metadata.decode_block_tables is not None
            assert metadata.decode_context_lens is not None
            decode_tables = metadata.decode_block_tables.to(torch.int32)
            decode_lens = metadata.decode_context_lens.to(torch.int32)
        prefill_tables = cu_q = cu_k = None
        max_q = max_k = 0
        if metadata.prefills:
            device = metadata.slot_mapping.device
            q_lens = [p.num_query_tokens for p in metadata.prefills]
            k_lens = [p.context_len for p in metadata.prefills]
            max_q, max_k = max(q_lens), max(k_lens)
            width = max(p.block_table.numel() for p in metadata.prefills)
            prefill_tables = torch.zeros(
                len(metadata.prefills), width, dtype=torch.int32, device=device
            )
            for row, prefill in enumerate(metadata.prefills):
                prefill_tables[row, : prefill.block_table.numel()] = prefill.block_table
            cu_q = _cumulative(q_lens, device)
            cu_k = _cumulative(k_lens, device)
        tensors = _StepTensors(decode_tables, decode_lens, prefill_tables, cu_q, cu_k, max_q, max_k)
        self._step = (metadata, tensors)
        return tensors


def _flash_options(sliding_window: int | None, soft_cap: float | None) -> dict[str, object]:
    """flash-attn keyword arguments for a layer's window and cap (its defaults otherwise)."""
    options: dict[str, object] = {}
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, 0)
    if soft_cap is not None:
        options["softcap"] = float(soft_cap)
    return options


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)
