"""engine-serve's KV cache and attention options (the paged cache's size, block, dtype and
prefix sharing)."""
from __future__ import annotations

import argparse

from engine.config import ATTENTION_BACKENDS, KV_CACHE_DTYPES
from protoserve.arg_types import parse_bytes


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV cache block (the unit of allocation and prefix sharing)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto = cpu_paged (our kernels) on CPU when they build, flash_attn or "
                        "cuda_paged on CUDA, else torch")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size, e.g. 4GiB (default: on CPU room for --max-num-seqs "
                   "full-length sequences, at most 4 GiB; on CUDA what "
                   "--gpu-memory-utilization leaves)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="auto = the model's dtype; int8 = values quantized per token and head "
                   "(1.9x the tokens in the same memory, half the bytes decode reads; default: "
                   "auto)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of device memory for weights + activations + KV cache")
    p.add_argument("--num-kv-blocks", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of a prompt prefix already computed")
