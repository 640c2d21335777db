"""Batch-1 weight bandwidth of linear_int on benchmarks/quantized_decode.py's projections
(qkv, o, gate_up, down of the ~0.5B Llama shape): GB/s of streamed weight bytes (panels and
scales) per thread count, int8 (per channel) and int4 (groups of 128), with int8 activations
and with the exact bf16-activation kernel.

Run from the repository root (on a quiet machine; numbers on a shared one are noise):
    .venv/bin/python -m benchmarks.int_linear_bandwidth
    .venv/bin/python -m benchmarks.int_linear_bandwidth --threads 1 2 --repeats 20
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.quantized_decode import SHAPE
from engine import ops
from engine.linear_kernel import set_int_activations
from engine.layers.quant.panels import pack_int_panels


def projections() -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features)."""
    hidden, inter = int(SHAPE["hidden_size"]), int(SHAPE["intermediate_size"])
    head_dim = hidden // int(SHAPE["num_attention_heads"])
    kv = int(SHAPE["num_key_value_heads"]) * head_dim
    return {"qkv": (hidden + 2 * kv, hidden), "o": (hidden, hidden),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def measure(bits: int, group: int | None, repeats: int, copies: int) -> float:
    """GB/s over one pass of `copies` layers' four projections, repeated (16 layers' weights,
    as in the model, do not fit the last-level cache; one layer's would)."""
    generator = torch.Generator().manual_seed(0)
    limit = 2 ** (bits - 1)
    layers = []
    total_bytes = 0
    for out_features, in_features in projections().values():
        q = torch.randint(-limit, limit, (out_features, in_features), dtype=torch.int8,
                          generator=generator)
        group_size = group or in_features
        scale = torch.rand(out_features, in_features // group_size, generator=generator) / 64
        packed, scales = pack_int_panels(q, scale.half().float(), bits, group_size)
        x = torch.randn(1, in_features, generator=generator).bfloat16()
        for _ in range(copies):
            layers.append((x, packed.clone(), scales.clone(), out_features, group_size))
            total_bytes += packed.numel() + scales.numel() * scales.element_size()

    def one_pass() -> None:
        for x, packed, scales, out_features, group_size in layers:
            ops.linear_int(x, packed, scales, None, out_features, bits, group_size)

    for _ in range(5):
        one_pass()
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    elapsed = (time.perf_counter() - start) / repeats
    return total_bytes / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch.set_num_threads values (default 1 2)")
    parser.add_argument("--repeats", type=int, default=10, help="passes timed (default 10)")
    parser.add_argument("--layers", type=int, default=int(SHAPE["num_hidden_layers"]),
                        help="layers' copies of the weights streamed per pass (default: the "
                             "model's 16)")
    args = parser.parse_args()
    if not ops.linear_bf16_available():
        raise SystemExit("needs the native AVX512_BF16 kernels")
    for activations in ("int8", "bf16"):
        set_int_activations(activations)
        for name, bits, group in (("int8", 8, None), ("int4", 4, 128)):
            for threads in args.threads:
                torch.set_num_threads(threads)
                gbps = measure(bits, group, args.repeats, args.layers)
                print(f"{name} {activations}-activations threads={threads}: {gbps:.1f} GB/s")


if __name__ == "__main__":
    main()
