"""Batch-1 decode of the same GGUF file, Q8_0 and Q4_0, in llama.cpp's llama-bench and here.

The ~0.5B Llama shape of benchmarks/quantized_decode.py (random weights, 16 layers by
default) is written once per type with tests/gguf_checkpoints.py's writer (the gguf package's
own quantizers), every matrix in the type (projections, embeddings and output, as
`llama-quantize --pure` would). Each file then runs in

  - llama.cpp: `llama-bench -m FILE -t THREADS -p 0 -n 64 -o json` (tokens/s of generation);
  - our engine: the model loaded from the file in bfloat16 (projections and LM head on the int
    kernels, int8 activations per block of 32: llama.cpp's arithmetic for these types),
    decoding --steps tokens one model step per token after a 32-token prompt (no scheduler or
    server around it: the same loop as quantized_decode.py).

Run from the repository root on a quiet machine:
    .venv/bin/python -m benchmarks.llamacpp_quant --llama-bench /work/llama.cpp/build/bin/llama-bench --threads 2
`--layers 2` makes a small model for a quick check of the script itself.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.quantized_decode import SHAPE, decode_tokens_per_second
from engine.config import ModelConfig
from engine.models.loader import load_model

TESTS = Path(__file__).resolve().parents[1] / "tests"


def write_files(directory: Path, layers: int, types: list[str]) -> dict[str, Path]:
    """The random model (bf16-rounded weights) and one GGUF file per type."""
    sys.path.insert(0, str(TESTS))
    from gguf_checkpoints import write_gguf
    from model_factory import build_tiny_model

    base = build_tiny_model(
        directory / "base", vocab_size=int(SHAPE["vocab_size"]),
        hidden_size=int(SHAPE["hidden_size"]), num_layers=layers,
        num_heads=int(SHAPE["num_attention_heads"]),
        num_kv_heads=int(SHAPE["num_key_value_heads"]),
        intermediate_size=int(SHAPE["intermediate_size"]),
        max_position_embeddings=int(SHAPE["max_position_embeddings"]), initializer_range=0.02)
    return {kind: write_gguf(base, directory / f"model-{kind}.gguf", projections=kind,
                             embeddings=kind, output=kind)
            for kind in types}


def llama_bench(binary: Path, model: Path, threads: int, tokens: int) -> float:
    result = subprocess.run(
        [str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
         "-o", "json"], capture_output=True, text=True, check=True)
    runs = json.loads(result.stdout)
    return float(next(run["avg_ts"] for run in runs if int(run.get("n_gen", 0)) > 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bench", type=Path, default=None,
                        help="llama-bench binary (default: none, our engine only)")
    parser.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0"],
                        choices=("Q8_0", "Q4_0"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layers", type=int, default=int(SHAPE["num_hidden_layers"]))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        files = write_files(Path(directory), args.layers, args.types)
        print(f"{'type':>5} {'ours tok/s':>11} {'llama.cpp tok/s':>16}  ours / llama.cpp")
        for kind, path in files.items():
            loaded = load_model(ModelConfig(model=str(path), dtype="bfloat16",
                                            attention_backend="cpu_paged"),
                                attention_backend="cpu_paged")
            ours = decode_tokens_per_second(loaded, args.steps)
            del loaded
            if args.llama_bench is None:
                print(f"{kind:>5} {ours:11.2f} {'-':>16}")
                continue
            theirs = llama_bench(args.llama_bench, path, args.threads, args.steps)
            print(f"{kind:>5} {ours:11.2f} {theirs:16.2f}  {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
