"""Paged attention kernels: our csrc kernels against the pure-torch paths, on CPU or CUDA.

Run from the repository root:
    .venv/bin/python -m benchmarks.attention_kernels                 # decode + prefill tables
    .venv/bin/python -m benchmarks.attention_kernels --no-prefill --batch-sizes 1 8
    .venv/bin/python -m benchmarks.attention_kernels --device cuda             # csrc/cuda, decode only

Decode (one query per sequence, 32 query / 8 KV heads, head_dim 128, bf16 by default):
    ours        engine.ops.paged_decode_attention (csrc/cpu)
    grouped     the torch backend's gather + grouped matmul + fp32 softmax
    sdpa        gather, then torch scaled_dot_product_attention with a mask
GB/s counts the K/V bytes each call must read. Each timed call cycles over enough distinct
"layers" (separate caches) that the K/V cannot stay in the last-level cache, as in a real
model step. The machine's own bandwidth is measured first (sum = read-only, copy = read+write),
on the device under test; on CUDA every sample ends with a device synchronize.

Prefill (one chunk of queries over a cached context): ours vs gather + SDPA, in GFLOP/s of
the causal attention actually computed.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from engine import ops
from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import decode_attention, gather_blocks

COLD_BYTES = 512 * 2**20  # K/V touched per timed call: well above any last-level cache
DEVICE = torch.device("cpu")  # set once by main() from --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_samples(fn: Callable[[], object], repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - start)
    return samples


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_samples(fn, repeats))


def measure_bandwidth(repeats: int) -> dict[str, tuple[float, float]]:
    """GB/s over 1 GiB buffers as (best, median): "read" from a sum (read-only), "copy"
    counting read + write. The best run is the machine's capability (kernel shares are
    quoted against it, the conservative choice); the median shows how busy the host is."""
    source = torch.randn(2**30 // 4, device=DEVICE)
    target = torch.empty_like(source)
    results = {}
    for name, fn, num_bytes in (("read", lambda: source.sum(), source.numel() * 4),
                                ("copy", lambda: target.copy_(source), 2 * source.numel() * 4)):
        samples = time_samples(fn, repeats)
        best, median = min(samples), statistics.median(samples)
        results[name] = (num_bytes / best / 1e9, num_bytes / median / 1e9)
    return results


class DecodeCase:
    """`num_layers` independent paged caches holding `batch` sequences of `context` tokens
    each, in shuffled blocks."""

    def __init__(self, args: argparse.Namespace, batch: int, context: int) -> None:
        dtype = getattr(torch, args.dtype)
        self.batch, self.context = batch, context
        self.block_size = args.block_size
        self.num_heads, self.num_kv_heads, self.head_dim = args.heads, args.kv_heads, args.head_dim
        blocks_per_seq = math.ceil(context / args.block_size)
        num_blocks = batch * blocks_per_seq
        self.kv_bytes = 2 * batch * context * self.num_kv_heads * self.head_dim * dtype.itemsize
        self.num_layers = max(1, math.ceil(COLD_BYTES / self.kv_bytes))
        shape = (2, num_blocks, args.block_size, self.num_kv_heads, self.head_dim)
        self.caches = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(self.num_layers)]
        # int32 tables, as the runner builds them for the kernels.
        self.tables = torch.randperm(num_blocks).view(batch, blocks_per_seq).to(DEVICE, torch.int32)
        self.lens = torch.full((batch,), context, dtype=torch.int64, device=DEVICE)
        self.query = torch.randn(batch, self.num_heads, self.head_dim, device=DEVICE).to(dtype)
        self.out = torch.empty_like(self.query)
        self.scale = self.head_dim**-0.5
        positions = torch.arange(blocks_per_seq * args.block_size, device=DEVICE)
        mask = torch.zeros(batch, positions.numel(), device=DEVICE)
        mask.masked_fill_(positions[None, :] >= self.lens[:, None], float("-inf"))
        self.metadata = AttentionMetadata(
            block_size=args.block_size,
            slot_mapping=torch.empty(0, dtype=torch.int64),
            num_decode_tokens=batch,
            decode_block_tables=self.tables.long(),
            decode_context_lens=self.lens,
            decode_mask=mask.view(batch, 1, 1, -1),
            prefills=(),
        )

    def ours(self) -> None:
        for cache in self.caches:
            ops.paged_decode_attention(
                self.out, self.query, cache, self.tables, self.lens, self.scale
            )

    def grouped(self) -> None:
        for cache in self.caches:
            decode_attention(self.query, cache, self.metadata, self.scale)

    def sdpa(self) -> None:
        batch, length = self.batch, self.tables.shape[1] * self.block_size
        for cache in self.caches:
            tables = self.metadata.decode_block_tables
            keys = gather_blocks(cache[0], tables).view(batch, length, self.num_kv_heads, -1)
            values = gather_blocks(cache[1], tables).view(batch, length, self.num_kv_heads, -1)
            F.scaled_dot_product_attention(
                self.query.unsqueeze(2),
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=self.metadata.decode_mask,
                scale=self.scale,
                enable_gqa=True,
            )


def run_decode(args: argparse.Namespace, read_bw: float) -> None:
    print(f"\ndecode: {args.heads} q heads / {args.kv_heads} kv heads, head_dim {args.head_dim}, "
          f"block {args.block_size}, {args.dtype}; ms per layer call, GB/s of K/V read")
    print(f"{'batch':>5} {'ctx':>5} {'KV MB':>7} | {'ours ms':>8} {'GB/s':>6} {'%read':>6} | "
          f"{'grouped':>8} {'GB/s':>6} | {'sdpa':>8} {'GB/s':>6} | {'vs grouped':>10}")
    print("(%read: ours against the best read-only bandwidth above)")
    for batch in args.batch_sizes:
        for context in args.context_lens:
            case = DecodeCase(args, batch, context)
            results = {}
            for name in ("ours", "grouped", "sdpa"):
                if name == "sdpa" and args.skip_sdpa:
                    results[name] = float("nan")
                    continue
                repeats = args.repeats if name == "ours" else max(3, args.repeats // 3)
                try:
                    results[name] = median_seconds(getattr(case, name), repeats) / case.num_layers
                except RuntimeError as error:  # a peer path failing must not lose the table
                    print(f"  {name} failed at batch {batch} ctx {context}: {error}")
                    results[name] = float("nan")
            gbs = {name: case.kv_bytes / t / 1e9 for name, t in results.items()}
            print(f"{batch:>5} {context:>5} {case.kv_bytes / 1e6:>7.1f} | "
                  f"{results['ours'] * 1e3:>8.3f} {gbs['ours']:>6.1f} "
                  f"{100 * gbs['ours'] / read_bw:>5.0f}% | "
                  f"{results['grouped'] * 1e3:>8.3f} {gbs['grouped']:>6.1f} | "
                  f"{results['sdpa'] * 1e3:>8.3f} {gbs['sdpa']:>6.1f} | "
                  f"{results['grouped'] / results['ours']:>9.1f}x")


def run_prefill(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    heads, kv_heads, dim, block_size = args.heads, args.kv_heads, args.head_dim, args.block_size
    print(f"\nprefill chunk over a cached context ({args.dtype}); GFLOP/s of causal attention")
    print(f"{'start':>6} {'chunk':>6} {'ctx':>6} | {'ours ms':>9} {'GF/s':>6} | "
          f"{'gather+sdpa':>11} {'GF/s':>6} | {'speedup':>7}")
    for context_start, chunk in args.prefill_shapes:
        context = context_start + chunk
        num_blocks = math.ceil(context / block_size)
        cache = torch.randn(2, num_blocks, block_size, kv_heads, dim).to(dtype)
        table = torch.randperm(num_blocks)
        query = torch.randn(chunk, heads, dim).to(dtype)
        out = torch.empty_like(query)
        scale = dim**-0.5
        positions = torch.arange(context)
        mask = positions[None, :] <= positions[context_start:, None]

        def ours() -> None:
            ops.paged_prefill_attention(out, query, cache, table, context_start, scale)

        def sdpa() -> None:
            keys = gather_blocks(cache[0], table).view(-1, kv_heads, dim)[:context]
            values = gather_blocks(cache[1], table).view(-1, kv_heads, dim)[:context]
            F.scaled_dot_product_attention(
                query.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale,
                enable_gqa=True,
            )

        # Visible (query, key) pairs times 4 * dim flops (q.k and p.v, multiply + add).
        pairs = chunk * context_start + chunk * (chunk + 1) / 2
        flops = 4 * dim * heads * pairs
        repeats = max(3, args.repeats // 3)
        t_ours = median_seconds(ours, repeats)
        t_sdpa = median_seconds(sdpa, repeats)
        print(f"{context_start:>6} {chunk:>6} {context:>6} | {t_ours * 1e3:>9.2f} "
              f"{flops / t_ours / 1e9:>6.1f} | {t_sdpa * 1e3:>11.2f} "
              f"{flops / t_sdpa / 1e9:>6.1f} | {t_sdpa / t_ours:>6.2f}x")


def parse_shape(text: str) -> tuple[int, int]:
    start, chunk = text.split(":")
    return int(start), int(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (decode only on cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--skip-sdpa", action="store_true", help="leave out the slow SDPA path")
    parser.add_argument("--no-prefill", action="store_true", help="decode table only")
    parser.add_argument("--prefill-shapes", type=parse_shape, nargs="+",
                        default=[(0, 512), (256, 256), (768, 256), (1792, 256), (1536, 512)],
                        metavar="START:CHUNK", help="cached context start : chunk length")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.native_available(DEVICE):
        raise SystemExit(f"the native {DEVICE.type} ops did not build; nothing to compare")
    if DEVICE.type == "cuda":
        # csrc/cuda has no prefill kernel (prefill runs SDPA or flash-attn there).
        args.no_prefill = True
        print(f"device {torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}")
    bandwidth = measure_bandwidth(max(7, args.repeats))
    (read_best, read_median), (copy_best, copy_median) = bandwidth["read"], bandwidth["copy"]
    print(f"{DEVICE.type}, threads {torch.get_num_threads()}; memory bandwidth, best (median) of runs: "
          f"read-only sum {read_best:.1f} ({read_median:.1f}) GB/s, "
          f"copy {copy_best:.1f} ({copy_median:.1f}) GB/s counting read + write")
    run_decode(args, read_best)
    if not args.no_prefill:
        run_prefill(args)


if __name__ == "__main__":
    main()
