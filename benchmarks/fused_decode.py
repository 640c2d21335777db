"""The one-call decode path against the per-op path it replaces, interleaved in one process.

Run from the repository root:
    .venv/bin/python -m benchmarks.fused_decode                 # batch 1, 4 rounds
    .venv/bin/python -m benchmarks.fused_decode --batch-size 8 --rounds 6
    .venv/bin/python -m benchmarks.fused_decode --family qwen3-moe --batch-size 16

The benchmark model (benchmarks/bench_model.py; --family: a benchmarks/family_models.py
shape, whose bytes read per decode token are printed too) decodes --steps tokens per round for
--batch-size requests, once with every pure-decode step through `ops.decode_layers_bf16`
(engine/models/fused_decode.py) and once with the per-op Python path, alternating, and prints
the milliseconds per step of each. The two must produce the same tokens (checked each round).
"""
from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.bench_model import ensure_bench_model
from benchmarks.family_models import FAMILY_SHAPES, active_weight_bytes, ensure_family_model
from engine.frontend.llm import LLM
from engine.models.fused_decode import FusedDecodeLayers
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--family", choices=sorted(FAMILY_SHAPES), default=None)
    args = parser.parse_args()
    model_dir = ensure_family_model(args.family) if args.family else ensure_bench_model()
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=1 << 30,
              max_num_seqs=max(8, args.batch_size))
    prompts = [[7 + i] * 64 for i in range(args.batch_size)]
    fused_applies = FusedDecodeLayers.applies

    def ms_per_step(fused: bool, steps: int) -> tuple[float, list[list[int]]]:
        FusedDecodeLayers.applies = fused_applies if fused else (lambda self, h, m: False)
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        return (time.perf_counter() - start) / steps * 1e3, [o.token_ids for o in outputs]

    ms_per_step(True, 16)  # warm-up of both paths
    ms_per_step(False, 16)
    times: dict[str, list[float]] = {"fused": [], "per-op": []}
    for _ in range(args.rounds):
        fused_ms, fused_tokens = ms_per_step(True, args.steps)
        per_op_ms, per_op_tokens = ms_per_step(False, args.steps)
        if fused_tokens != per_op_tokens:
            raise RuntimeError("the fused and per-op paths produced different tokens")
        times["fused"].append(fused_ms)
        times["per-op"].append(per_op_ms)
    FusedDecodeLayers.applies = fused_applies
    for name, runs in times.items():
        print(f"{name:>7}: {statistics.median(runs):.2f} ms per step (median; runs "
              f"{' '.join(f'{t:.2f}' for t in runs)})")
    ratio = statistics.median(times["per-op"]) / statistics.median(times["fused"])
    print(f"batch {args.batch_size}: per-op / fused = {ratio:.2f}x (prefill steps included, "
          f"{args.steps} decode steps per round)")
    if args.family:
        # The roofline's input: divide by benchmarks.roofline's measured copy bandwidth.
        total, active = active_weight_bytes(args.family)
        fused_s = statistics.median(times["fused"]) / 1e3
        print(f"{args.family}: {active / 2**20:.1f} MiB of {total / 2**20:.1f} MiB weights read "
              f"per decode step at batch 1; fused reads them at {active / fused_s / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
