"""int8 linear layers on CPU by token count: W8A8 (int8 x int8: AMX-INT8, AVX512-VNNI) against
W8A16 (int8 weights, bf16 activations) and bf16, over one decode step's projections.

Run from the repository root:
    .venv/bin/python -m benchmarks.w8a8_kernels                      # tokens 1..256
    .venv/bin/python -m benchmarks.w8a8_kernels --tokens 1 64 --repeats 5

One timed call runs every projection of the model's layers in order, each with its own
weights (as in a real step, they cannot stay in cache):
    bf16        engine.ops.linear_bf16 (AMX from 4 tokens where the CPU has it)
    w8a16       QuantizedLinear int8 per channel (linear_int; from 16 tokens a transient bf16
                copy through linear_bf16)
    w8a8        QuantizedLinear W8A8, its kernel chosen by `auto` (AMX from 16 tokens, else VNNI)
    w8a8-vnni   the same, pinned to the VNNI kernel
The W8A8 rows include quantizing the activations per token. Ratios are against bf16.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.attention_kernels import median_seconds
from engine import linear_kernel, ops
from engine.layers.linear import Linear
from engine.layers.quantized_linear import ONLINE_SCHEMES, QuantizedLinear, WeightQuant

W8A8 = WeightQuant(bits=8, group_size=None, method="int8", int8_activations=True)


def layer_shapes(hidden: int, intermediate: int, kv_dim: int, layers: int
                 ) -> list[tuple[int, int]]:
    per_layer = [(hidden, hidden + 2 * kv_dim), (hidden, hidden), (hidden, 2 * intermediate),
                 (intermediate, hidden)]
    return per_layer * layers


def build(shapes: list[tuple[int, int]], quant: WeightQuant | None) -> list[torch.nn.Module]:
    modules: list[torch.nn.Module] = []
    for index, (in_features, out_features) in enumerate(shapes):
        linear = Linear(in_features, out_features, bias=False, dtype=torch.bfloat16,
                        device="cpu")
        generator = torch.Generator().manual_seed(index)
        linear.weight.data.copy_(torch.randn(out_features, in_features, generator=generator)
                                 * 0.02)
        if quant is None:
            linear.prepack_for_cpu("panels")
            modules.append(linear)
            continue
        layer = QuantizedLinear.from_weight(linear, quant)
        layer.finalize(True)
        modules.append(layer)
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--kv-dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not ops.linear_bf16_available():
        raise SystemExit("needs the AVX512_BF16 kernels")
    shapes = layer_shapes(args.hidden, args.intermediate, args.kv_dim, args.layers)
    rows = {"bf16": build(shapes, None), "w8a16": build(shapes, ONLINE_SCHEMES["int8"]),
            "w8a8": build(shapes, W8A8)}
    print(f"{'tokens':>6} {'bf16 ms':>9} {'w8a16 ms':>9} {'w8a8 ms':>9} {'vnni ms':>9}  "
          "w8a16/bf16 w8a8/bf16")
    for tokens in args.tokens:
        inputs = {shape[0]: torch.randn(tokens, shape[0]).to(torch.bfloat16) for shape in shapes}

        def run(modules: list[torch.nn.Module]) -> Callable[[], None]:
            def step() -> None:
                with torch.inference_mode():
                    for module, (in_features, _) in zip(modules, shapes, strict=True):
                        module(inputs[in_features])
            return step

        times = {name: median_seconds(run(modules), args.repeats)
                 for name, modules in rows.items()}
        previous = linear_kernel.set_w8a8_kernel("vnni")
        try:
            times["vnni"] = median_seconds(run(rows["w8a8"]), args.repeats)
        finally:
            linear_kernel.set_w8a8_kernel(previous)
        ms = {name: value * 1e3 for name, value in times.items()}
        print(f"{tokens:6d} {ms['bf16']:9.2f} {ms['w8a16']:9.2f} {ms['w8a8']:9.2f} "
              f"{ms['vnni']:9.2f}  {ms['bf16'] / ms['w8a16']:9.2f}x {ms['bf16'] / ms['w8a8']:8.2f}x")


if __name__ == "__main__":
    main()
