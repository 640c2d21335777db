"""bfloat16 linear layers on CPU: our AVX512_BF16 panel kernel against oneDNN and F.linear.

Run from the repository root:
    .venv/bin/python -m benchmarks.linear_kernels                       # tokens 1..256
    .venv/bin/python -m benchmarks.linear_kernels --tokens 1 8 --repeats 15

One timed call runs every linear of a whole model's step in order (by default the 12-layer,
768-wide benchmark model: qkv, o, gate_up and down per layer, then the 32k-row LM head),
each with its own weights, so the ~200 MB of weights cannot stay in cache, as in a real step:
    ours      engine.ops.linear_bf16 over weights packed by engine.ops.pack_linear_weight
    onednn    torch.ops.mkldnn._linear_pointwise over oneDNN-reordered weights
    plain     F.linear over the plain [out, in] weights
GB/s counts the weight bytes each step must read (the decode roofline); GFLOP/s 2 x tokens x
weights. The machine's read bandwidth is measured first (benchmarks.attention_kernels).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.nn import functional as F

from benchmarks.attention_kernels import median_seconds, measure_bandwidth
from engine import ops


def model_shapes(hidden: int, intermediate: int, kv_dim: int, layers: int,
                 vocab: int) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear of one decode step, in order."""
    per_layer = [(hidden, hidden + 2 * kv_dim), (hidden, hidden), (hidden, 2 * intermediate),
                 (intermediate, hidden)]
    return per_layer * layers + [(hidden, vocab)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 256])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--kv-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-plain", action="store_true", help="skip the F.linear column")
    args = parser.parse_args()
    if not ops.linear_bf16_available():
        raise SystemExit("our linear kernel needs AVX512_BF16 and a C++ toolchain")

    torch.manual_seed(0)
    shapes = model_shapes(args.hidden, args.intermediate, args.kv_dim, args.layers, args.vocab)
    weights = [torch.randn(n, k).bfloat16() for k, n in shapes]
    panels = [ops.pack_linear_weight(w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    read_best, _ = measure_bandwidth(7)["read"]
    print(f"threads {torch.get_num_threads()}; read bandwidth {read_best:.1f} GB/s; "
          f"{len(shapes)} linears, {weight_bytes / 1e6:.0f} MB of weights per step")
    print(f"{'tokens':>6} | {'ours ms':>8} {'GB/s':>5} {'GFLOP/s':>7} | {'onednn ms':>9} "
          f"{'GFLOP/s':>7} | {'plain ms':>8} | ours vs onednn")
    for num_tokens in args.tokens:
        inputs = {k: torch.randn(num_tokens, k).bfloat16() for k, _ in shapes}

        def ours() -> None:
            for (k, n), packed in zip(shapes, panels, strict=True):
                ops.linear_bf16(inputs[k], packed, None, n)

        def dnn() -> None:
            for (k, _), packed in zip(shapes, onednn, strict=True):
                torch.ops.mkldnn._linear_pointwise(inputs[k], packed, None, "none", [], "")

        def plain() -> None:
            for (k, _), weight in zip(shapes, weights, strict=True):
                F.linear(inputs[k], weight)

        def median(fn: Callable[[], None]) -> float:
            return median_seconds(fn, args.repeats)

        t_ours, t_dnn = median(ours), median(dnn)
        t_plain = float("nan") if args.no_plain else median(plain)
        flops = 2 * num_tokens * weight_bytes / 2
        print(f"{num_tokens:>6} | {t_ours * 1e3:8.2f} {weight_bytes / t_ours / 1e9:5.1f} "
              f"{flops / t_ours / 1e9:7.0f} | {t_dnn * 1e3:9.2f} {flops / t_dnn / 1e9:7.0f} | "
              f"{t_plain * 1e3:8.2f} | {t_dnn / t_ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
