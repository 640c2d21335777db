"""Offline multi-LoRA throughput: the same prompts with 4 adapters mixed uniformly vs the base
model alone, in one process on one engine (`--enable-lora` with 4 slots), so the only
difference is the adapters' per-row shrink/expand (engine/layers/lora.py; in bf16 with the
native ops, csrc/cpu/lora_bf16.cpp, also inside the fused decode layers).

Run from the repository root:
    .venv/bin/python -m benchmarks.lora_throughput [--num-prompts 32] [--input-len 128] \
        [--output-len 64] [--rank 16] [--repeats 3] [--cpu-time]

The adapters are random PEFT directories (rank --rank on q/k/v/o/gate/up/down, written with
safetensors) for the benchmark model (benchmarks/bench_model.py); the target of issue 23 is
>= 0.8x of the base model's throughput. --cpu-time divides by this process's CPU seconds
instead of wall time: on a host shared with other work (run it with one torch thread,
OMP_NUM_THREADS=1) the ratio then holds where wall-clock figures swing several-fold.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.bench_model import DEFAULT_MODEL_DIR, ensure_bench_model
from engine.config import LoRAConfig
from engine.frontend.llm import LLM
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(model_dir: Path, out_dir: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory for the model in `model_dir` with random A and B."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden),
              "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target, (out_features, in_features) in shapes.items():
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(
                rank, in_features, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(
                out_features, rank, generator=generator) * 0.02
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "bias": "none", "base_model_name_or_path": str(model_dir)}))
    return out_dir


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams,
         loras: list[LoRARequest | None], cpu_time: bool = False) -> float:
    """Generated tokens per second (of wall time, or of this process's CPU time)."""
    clock = time.process_time if cpu_time else time.perf_counter
    start = clock()
    outputs = llm.generate(prompts, params, lora_requests=loras)
    elapsed = clock() - start
    return sum(len(o.token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-time", action="store_true",
                        help="tokens per CPU second of this process, not per wall second")
    args = parser.parse_args()

    model_dir = ensure_bench_model(args.model_dir)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 32000) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [
            LoRARequest(f"adapter{i}", i + 1, str(write_random_adapter(
                model_dir, Path(tmp) / f"adapter{i}", args.rank, seed=i)))
            for i in range(4)
        ]
        llm = LLM(str(model_dir), dtype=args.dtype, device=args.device,
                  kv_cache_memory=1 << 30, enable_prefix_caching=False,
                  lora=LoRAConfig(max_loras=4, max_lora_rank=args.rank))
        mixed = [adapters[i % 4] for i in range(args.num_prompts)]
        base_only: list[LoRARequest | None] = [None] * args.num_prompts
        _run(llm, prompts[:4], params, mixed[:4])  # warm-up: loads every adapter into a slot
        results: dict[str, list[float]] = {"base": [], "4 adapters": []}
        for _ in range(args.repeats):  # interleaved, so drift on a shared host hits both
            results["base"].append(_run(llm, prompts, params, base_only, args.cpu_time))
            results["4 adapters"].append(_run(llm, prompts, params, mixed, args.cpu_time))
    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, rank "
          f"{args.rank}, {args.dtype}, median of {args.repeats}"
          f"{' (per CPU second)' if args.cpu_time else ''}")
    for name, values in results.items():
        print(f"{name:>12}: {statistics.median(values):9.1f} tok/s  (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(results["4 adapters"]) / statistics.median(results["base"])
    print(f"4 adapters / base: {ratio:.2f}x")


if __name__ == "__main__":
    main()
