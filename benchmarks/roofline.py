"""Decode roofline: this machine's copy bandwidth and matmul rates, a model's decode-step floor,
and our engine's measured decode step against it.

A decode step must stream every weight it multiplies by plus the KV cache of every sequence,
and do 2 FLOPs per streamed parameter per sequence, so
    floor = max(bytes / copy bandwidth, 2 * streamed params * batch / GEMM rate)
where bytes = streamed params * dtype bytes + batch * context * KV bytes per token. The input
embedding table is not streamed (one row per sequence is gathered), unless it is tied to the
LM head. Bandwidth is that of 1 GiB tensor copies counting read + write bytes
(benchmarks.attention_kernels), the best run before or after the engine's; the compute rate is
the best run of a large square GEMM in the model dtype (the fastest of F.linear, a
oneDNN-packed weight and our bf16 panel kernel). Best runs, because other load on a shared
machine only lowers them, and a lowered floor would flatter the engine. The
measured step is the engine's whole `step()` (schedule, forward, sample, update) on steps where
every running sequence decodes, timed in process through `engine.frontend.llm.LLM`.
"% of roofline" = floor / measured; target: batch-1 decode >= 70% of the bandwidth floor.

Run from the repository root:
    .venv/bin/python -m benchmarks.roofline [--model-dir DIR] [--batch-sizes 1 8 64] \
        [--input-len 32] [--output-len 64] [--repeats 3] [--result-json r.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Allow `python benchmarks/roofline.py` as well as `-m benchmarks...`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import DEFAULT_MODEL_DIR, count_parameters, ensure_bench_model

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class DecodeShape:
    """What one decode step of a Llama-shaped model has to read and multiply."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_parameters: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> DecodeShape:
        config = json.loads((model_dir / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            hidden_size=config["hidden_size"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings")),
            num_parameters=count_parameters(model_dir),
        )

    @property
    def streamed_parameters(self) -> int:
        """Parameters read in full every step: all but an untied input embedding table."""
        embedding = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_parameters - embedding

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class DecodeFloor:
    bytes_per_step: float
    bandwidth_s: float
    compute_s: float

    @property
    def floor_s(self) -> float:
        return max(self.bandwidth_s, self.compute_s)


def decode_step_floor(shape: DecodeShape, batch: int, context_len: float, dtype_bytes: int,
                      bandwidth_bytes_per_s: float, flops_per_s: float) -> DecodeFloor:
    """Lower bound on one decode step of `batch` sequences, each attending `context_len`
    cached tokens."""
    params = shape.streamed_parameters
    num_bytes = params * dtype_bytes + batch * context_len * shape.kv_bytes_per_token(dtype_bytes)
    return DecodeFloor(num_bytes, num_bytes / bandwidth_bytes_per_s,
                       2 * params * batch / flops_per_s)


# --- machine rates ---------------------------------------------------------------------------


def best_call_s(fn: Callable[[], object], repeats: int, min_rep_s: float = 0.05) -> float:
    """Seconds per call in the fastest of `repeats` reps, each long enough to time a
    sub-millisecond GEMV. The fastest, because other load on a shared machine only ever
    slows a rep down: the best one is the machine's capability."""
    fn()  # first touch: page faults, kernel selection
    start = time.perf_counter()
    fn()
    calls = max(1, int(min_rep_s / max(time.perf_counter() - start, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return min(samples)


def matmul_rate(rows: int, inner: int, cols: int, dtype_name: str, repeats: int) -> float:
    """FLOP/s of [rows x inner] @ [inner x cols] as a model's linear layer runs it: the fastest
    of F.linear and, in bfloat16, a oneDNN-prepacked weight and our panel kernel."""
    import torch

    from engine import ops

    dtype = getattr(torch, dtype_name)
    x = torch.randn(rows, inner).to(dtype)
    weight = torch.randn(cols, inner).to(dtype)  # nn.Linear layout: [out, in]
    candidates: list[Callable[[], object]] = [lambda: torch.nn.functional.linear(x, weight)]
    if dtype == torch.bfloat16:
        if torch.backends.mkldnn.is_available():
            onednn = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
            pointwise = torch.ops.mkldnn._linear_pointwise
            candidates.append(lambda: pointwise(x, onednn, None, "none", [], ""))
        if ops.linear_bf16_available():
            panels = ops.pack_linear_weight(weight)
            candidates.append(lambda: ops.linear_bf16(x, panels, None, cols))
    with torch.inference_mode():
        seconds = min(best_call_s(fn, repeats) for fn in candidates)
    return 2 * rows * inner * cols / seconds


# --- the engine's decode step ----------------------------------------------------------------


class DecodeStepTimer:
    """Times every `EngineCore.step()` of an LLM and keeps the steps in which every scheduled
    sequence decodes one token (no prefill), with their batch size and mean context length."""

    def __init__(self, llm) -> None:
        self.batch = None
        self.samples: list[tuple[int, float, float]] = []  # (batch size, seconds, mean ctx)
        execute, step = llm.runner.execute, llm.core.step

        def recording_execute(batch):
            self.batch = batch
            return execute(batch)

        def timed_step():
            self.batch = None
            start = time.perf_counter()
            outputs = step()
            seconds = time.perf_counter() - start
            rows = self.batch.requests if self.batch is not None else []
            if rows and all(row.is_decode for row in rows):
                # A decode row attends its cached tokens plus the one it computes.
                context = statistics.fmean(row.start + 1 for row in rows)
                self.samples.append((len(rows), seconds, context))
            return outputs

        # Instance attributes shadow the methods; EngineCore reaches the runner the same way.
        llm.runner.execute = recording_execute
        llm.core.step = timed_step


def measure_decode(llm, timer: DecodeStepTimer, batch: int, args: argparse.Namespace,
                   vocab_size: int) -> dict[str, Any]:
    import torch

    from engine.sampling_params import SamplingParams

    def run(output_len: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        prompts = torch.randint(3, vocab_size, (batch, args.input_len), generator=generator)
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        llm.core.kv_cache.pool.reset_prefix_cache()
        llm.generate(prompts.tolist(), params)

    run(4, args.seed + 10_000 + batch)  # warm-up: kernels for this batch's shapes
    per_rep = []
    contexts = []
    for rep in range(args.repeats):
        timer.samples.clear()
        run(args.output_len, args.seed + 100 * rep + batch)
        full = [(s, c) for n, s, c in timer.samples if n == batch]
        if not full:
            raise RuntimeError(f"batch {batch}: no step decoded all {batch} sequences at once")
        per_rep.append(statistics.median(s for s, _ in full))
        contexts.extend(c for _, c in full)
    return {"step_s_median": statistics.median(per_rep), "step_s_runs": per_rep,
            "context_len_mean": statistics.fmean(contexts)}


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                   help="a directory with config.json (the benchmark model is built there if "
                        "it is the default and missing)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                   help="weights and KV cache of the engine run; sets the floor's bytes and rate")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm-size", type=int, default=2048, help="M = K = N of the large GEMM")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: every core this process may use)")
    p.add_argument("--skip-engine", action="store_true", help="machine rates and floors only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None)
    return p.parse_args(argv)


def measure_bandwidth_gb_s(repeats: int) -> dict[str, tuple[float, float]]:
    from benchmarks.attention_kernels import measure_bandwidth

    gb_per_s = measure_bandwidth(max(5, repeats))  # (best, median) over 1 GiB buffers
    print("bandwidth GB/s, best (median): " + ", ".join(
        f"{name} {best:.1f} ({median:.1f})" for name, (best, median) in gb_per_s.items()),
        flush=True)
    return gb_per_s


def measure_matmul_rates(args: argparse.Namespace, hidden: int) -> dict[str, dict[str, float]]:
    rates: dict[str, dict[str, float]] = {}
    n = args.gemm_size
    for dtype in ("bfloat16", "float32"):
        rates[dtype] = {"gemm": matmul_rate(n, n, n, dtype, args.repeats)}
        for batch in args.batch_sizes:
            rates[dtype][f"decode_b{batch}"] = matmul_rate(batch, hidden, 4 * hidden, dtype,
                                                           args.repeats)
        shapes = " ".join(f"{k} {v / 1e9:.1f}" for k, v in rates[dtype].items())
        print(f"{dtype} GFLOP/s, best of {args.repeats} (gemm {n}^3; decode_bB = [B x {hidden}]"
              f" @ [{hidden} x {4 * hidden}]): {shapes}", flush=True)
    return rates


def print_row(row: dict[str, Any], floor: DecodeFloor) -> None:
    measured = row.get("step_s_median")
    line = (f"{row['batch']:>5}{row['context_len_mean']:>6.0f}"
            f"{(measured or math.nan) * 1e3:>13.2f}{floor.bandwidth_s * 1e3:>10.2f}"
            f"{floor.compute_s * 1e3:>9.2f}{floor.floor_s * 1e3:>10.2f}")
    if measured:
        row["pct_of_roofline"] = pct = 100 * floor.floor_s / measured
        row["pct_of_bandwidth_roofline"] = pct_bw = 100 * floor.bandwidth_s / measured
        line += f"{pct:>11.1f}%{pct_bw:>14.1f}%"
        if row["batch"] == 1:
            verdict = "meets" if pct_bw >= 70 else "MISSES"
            line += f"  (batch 1: {verdict} the >= 70% bandwidth target)"
    print(line, flush=True)


def main() -> None:
    args = parse_args()
    import torch

    # One thread count for the micro-benchmarks and the engine: every core this process may use.
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model_dir = Path(args.model_dir).expanduser()
    if model_dir == DEFAULT_MODEL_DIR or not (model_dir / "config.json").is_file():
        model_dir = ensure_bench_model(model_dir)
    shape = DecodeShape.from_model_dir(model_dir)
    dtype_bytes = DTYPE_BYTES[args.dtype]
    print(f"model {model_dir}: {shape.num_parameters / 1e6:.1f}M params, "
          f"{shape.streamed_parameters / 1e6:.1f}M streamed per step, "
          f"{shape.kv_bytes_per_token(dtype_bytes) / 1024:.1f} KiB KV per token ({args.dtype}); "
          f"{torch.get_num_threads()} threads", flush=True)
    from benchmarks.machine import machine_info

    machine = machine_info()
    bandwidth_runs = [measure_bandwidth_gb_s(args.repeats)]
    rates = measure_matmul_rates(args, shape.hidden_size)
    rows: list[dict[str, Any]] = [
        {"batch": batch, "context_len_mean": args.input_len + args.output_len / 2}
        for batch in args.batch_sizes]
    if not args.skip_engine:
        from engine.frontend.llm import LLM

        llm = LLM(str(model_dir), dtype=args.dtype, kv_cache_memory=1 << 30,
                  max_num_seqs=max(args.batch_sizes))
        timer = DecodeStepTimer(llm)
        for row in rows:
            row.update(measure_decode(llm, timer, row["batch"], args, shape.vocab_size))
            print(f"batch {row['batch']}: decode step {row['step_s_median'] * 1e3:.2f} ms "
                  f"(median per run: {[round(t * 1e3, 2) for t in row['step_s_runs']]})",
                  flush=True)
        # Measured again after the engine, so that a busy spell during the first measurement
        # does not lower the floor the engine is held to.
        bandwidth_runs.append(measure_bandwidth_gb_s(args.repeats))
    bandwidth = 1e9 * max(run["copy"][0] for run in bandwidth_runs)
    flops = rates[args.dtype]["gemm"]
    print(f"\nfloor: copy bandwidth {bandwidth / 1e9:.1f} GB/s (best run), {args.dtype} GEMM "
          f"{flops / 1e9:.0f} GFLOP/s\n{'batch':>5}{'ctx':>6}{'measured ms':>13}{'bw floor':>10}"
          f"{'compute':>9}{'floor ms':>10}{'% roofline':>12}{'% bw roofline':>15}")
    for row in rows:
        floor = decode_step_floor(shape, row["batch"], row["context_len_mean"],
                                  dtype_bytes, bandwidth, flops)
        row.update({**asdict(floor), "floor_s": floor.floor_s})
        print_row(row, floor)

    if args.result_json:
        machine["loadavg_end"] = os.getloadavg()
        result = {"machine": machine, "model": {"dir": str(model_dir), **asdict(shape),
                                                 "streamed_parameters": shape.streamed_parameters},
                  "args": vars(args), "bandwidth_gb_per_s_best_median": bandwidth_runs,
                  "floor_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": rates,
                  "decode": rows}
        Path(args.result_json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
