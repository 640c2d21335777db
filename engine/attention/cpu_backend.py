"""Paged attention through our own kernels (csrc/, reached only via engine.ops).

Registered as "cpu_paged" (and "cuda_paged" for the CUDA build of the same ops): the cache
write, the decode rows and every prefill run go through `engine.ops`, which falls back to the
pure-torch code per op where a native op is missing (e.g. prefill on CUDA).

Step layout (see backend.py): decode rows first, one kernel call for all of them; then one
call per prefill run, whose queries attend over the cache (their own K/V included, written
at the start of the step):

    out rows:  [ d0 .. d(Bd-1) | p0 p0 p0 | p1 p1 | ... ]
                 paged_decode_attention   paged_prefill_attention (one call per run)

A layer's sliding window and soft-cap go to every call (the CPU kernels skip the blocks
outside the window; on CUDA engine.ops serves such calls with the torch code). Attention
sinks (GPT-OSS) go to every call too; the CPU kernels add them to each head's denominator.
"""
from __future__ import annotations

import torch

from engine import ops
from engine.attention.backend import AttentionMetadata, check_attention_options
from engine.attention.kv_quant import is_quantized
from engine.attention.torch_backend import check_sinks, prefill_attention


class PagedOpsAttentionBackend:
    def __init__(self, name: str = "cpu_paged") -> None:
        self.name = name

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
        ops.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        # Kernels write straight into row slices of one output (no concatenation).
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        num_decode_tokens = metadata.num_decode_tokens
        if num_decode_tokens:
            assert metadata.decode_block_tables is not None
            assert metadata.decode_context_lens is not None
            ops.paged_decode_attention(
                out[:num_decode_tokens],
                query[:num_decode_tokens],
                kv_cache,
                metadata.decode_block_tables,
                metadata.decode_context_lens,
                scale,
                sliding_window=sliding_window,
                soft_cap=soft_cap,
                sinks=sinks,
            )
        for prefill in metadata.prefills:
            rows = slice(prefill.query_start, prefill.query_start + prefill.num_query_tokens)
            if prefill.context_start == 0 and not self._kernel_prefill(query, kv_cache):
                # Nothing cached: SDPA on the fresh K/V is the faster path for this dtype.
                out[rows] = prefill_attention(
                    query[rows], key[rows], value[rows], kv_cache, prefill, scale,
                    sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
                )
                continue
            ops.paged_prefill_attention(
                out[rows], query[rows], kv_cache, prefill.block_table, prefill.context_start, scale,
                sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
            )
        return out

    @staticmethod
    def _kernel_prefill(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether a prefill with no cached context runs on our kernel: yes for bf16 on CPU,
        where it beats SDPA; float32, CUDA and an int8 cache keep SDPA on the fresh K/V."""
        return (query.device.type == "cpu" and query.dtype == torch.bfloat16
                and not is_quantized(kv_cache))
