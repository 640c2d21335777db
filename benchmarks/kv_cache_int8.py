"""Decode attention over the int8 KV cache (--kv-cache-dtype int8) against the bf16 cache,
same kernels family, same run: the native paged decode kernel (csrc/cpu) on cold caches.

Run from the repository root (on a quiet machine):
    .venv/bin/python -m benchmarks.kv_cache_int8
    .venv/bin/python -m benchmarks.kv_cache_int8 --batch-sizes 1 16 --context-lens 2048 8192

The int8 cache holds the same values quantized per (token, kv head) with a float32 scale
(engine/attention/kv_quant.py): 2 * (head_dim + 4) bytes per token and kv head instead of
4 * head_dim. Decode at long context streams the whole cache per layer, so the table reports
ms per layer call and the K/V bytes each call reads.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.attention_kernels import COLD_BYTES, DecodeCase, measure_bandwidth, median_seconds
from engine import ops
from engine.attention.kv_quant import quantize_rows


class Int8Case:
    """The bf16 case's caches quantized (as many layers as keep the int8 K/V cold too)."""

    def __init__(self, case: DecodeCase) -> None:
        self.case = case
        rows = 2 * case.batch * case.context * case.num_kv_heads
        self.kv_bytes = rows * (case.head_dim + 4)
        num_layers = max(1, -(-COLD_BYTES // self.kv_bytes))
        quantized = [quantize_rows(cache.float()) for cache in case.caches]
        self.caches = [quantized[i % len(quantized)].clone() for i in range(num_layers)]

    def ours(self) -> None:
        case = self.case
        for cache in self.caches:
            ops.paged_decode_attention(case.out, case.query, cache, case.tables, case.lens,
                                       case.scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    args = parser.parse_args()
    args.dtype = "bfloat16"
    if not ops.native_available():
        raise SystemExit("the native CPU ops are not built: nothing to measure")
    bandwidth = measure_bandwidth(args.repeats)
    read_bw = bandwidth["read"][0]
    print(f"machine read bandwidth: {read_bw:.1f} GB/s; {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'ctx':>6} | {'bf16 ms':>8} {'GB/s':>6} | {'int8 ms':>8} {'GB/s':>6} | "
          f"{'speed-up':>8}")
    for batch in args.batch_sizes:
        for context in args.context_lens:
            bf16 = DecodeCase(args, batch, context)
            int8 = Int8Case(bf16)
            t_bf16 = median_seconds(bf16.ours, args.repeats) / len(bf16.caches)
            t_int8 = median_seconds(int8.ours, args.repeats) / len(int8.caches)
            print(f"{batch:>5} {context:>6} | {t_bf16 * 1e3:>8.3f} "
                  f"{bf16.kv_bytes / t_bf16 / 1e9:>6.1f} | {t_int8 * 1e3:>8.3f} "
                  f"{int8.kv_bytes / t_int8 / 1e9:>6.1f} | {t_bf16 / t_int8:>7.2f}x")


if __name__ == "__main__":
    main()
