"""Offline throughput: protoserve `LLM.generate` vs transformers `generate` and `generate_batch`.

All three run in one process on the same bf16 checkpoint (benchmarks/bench_model.py), the
same random prompts and exactly `--output-len` greedy tokens per prompt (EOS ignored), so the
only difference is the engine. This is the engine ceiling in the sense of
`vllm bench throughput`: every prompt is submitted at t = 0 and no server is involved.

Run from the repository root:
    .venv/bin/python -m benchmarks.offline_throughput [--num-prompts 32] [--input-len 128] \
        [--output-len 128] [--repeats 3] [--json results.json]
On a GPU, a Llama-3-8B-shaped model with random weights (no checkpoint needed; both engines
get the same weights, copied from the transformers model into ours):
    .venv/bin/python -m benchmarks.offline_throughput --device cuda --shape llama3-8b --num-prompts 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Allow `python benchmarks/offline_throughput.py` as well as `-m benchmarks...`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: F401  (torch warns when imported without numpy loaded first)
import torch

from benchmarks.bench_model import (
    CONFIG_ONLY_SHAPES,
    SEED,
    SHAPE_NAMES,
    count_parameters,
    ensure_bench_model,
    ensure_shape_dir,
)
from benchmarks.hf_runners import (
    Outputs,
    Prompts,
    load_hf_model,
    make_hf_generate,
    make_hf_generate_batch,
)
from benchmarks.machine import machine_info


@dataclass
class RunResult:
    name: str
    wall_s: list[float] = field(default_factory=list)
    # Process CPU time: on a shared machine it shows whether a slow run waited for a core.
    cpu_s: list[float] = field(default_factory=list)
    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    skipped: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def best_s(self) -> float:
        return min(self.wall_s)

    def summary(self) -> dict[str, object]:
        if self.skipped is not None:
            return {"name": self.name, "skipped": self.skipped}
        median, total = self.median_s, self.num_output_tokens + self.num_prompt_tokens
        return {
            "name": self.name,
            "wall_s_runs": [round(t, 3) for t in self.wall_s],
            "cpu_s_runs": [round(t, 3) for t in self.cpu_s],
            "wall_s_median": round(median, 3),
            "wall_s_best": round(self.best_s, 3),
            "output_tokens_per_s": round(self.num_output_tokens / median, 1),
            "total_tokens_per_s": round(total / median, 1),
            "requests_per_s": round(self.num_requests / median, 3),
            "output_tokens_per_s_best": round(self.num_output_tokens / self.best_s, 1),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
        }


@dataclass
class Contender:
    result: RunResult
    run: Callable[[Prompts], Outputs]
    outputs: Outputs = field(default_factory=list)


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> Prompts:
    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids so prompts never contain the BOS/EOS/pad ids of the config.
    ids = torch.randint(3, vocab_size, (num_prompts, input_len), generator=generator)
    return ids.tolist()


def time_once(contender: Contender, prompts: Prompts, output_len: int) -> None:
    """One timed `run(prompts)`; checks that every prompt got exactly output_len tokens."""
    result = contender.result
    cpu_start, start = time.process_time(), time.perf_counter()
    outputs = contender.run(prompts)
    result.wall_s.append(time.perf_counter() - start)
    result.cpu_s.append(time.process_time() - cpu_start)
    lengths = {len(tokens) for tokens in outputs}
    if len(outputs) != len(prompts) or lengths != {output_len}:
        raise RuntimeError(f"{result.name}: expected {output_len} tokens per prompt, got {lengths}")
    result.num_requests = len(prompts)
    result.num_prompt_tokens = sum(len(p) for p in prompts)
    result.num_output_tokens = sum(len(o) for o in outputs)
    contender.outputs = outputs
    wall, cpu = result.wall_s[-1], result.cpu_s[-1]
    print(f"  {result.name}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)


# --- ours (the transformers baselines live in hf_runners.py) ------------------------------


def make_ours(
    model_dir: Path, args: argparse.Namespace, weights_from: torch.nn.Module | None = None
) -> Callable[[Prompts], Outputs]:
    """`weights_from`: a transformers model whose weights replace our dummy ones (the model
    directory then holds only a config.json)."""
    from engine.frontend.llm import LLM
    from engine.sampling_params import SamplingParams

    output_len = args.output_len
    # Default scheduler settings; max_num_seqs only grows when the workload needs more.
    llm = LLM(
        str(model_dir),
        dtype="bfloat16",
        device=args.device,
        load_format="auto" if weights_from is None else "dummy",
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=max(256, args.num_prompts),
    )
    if weights_from is not None:
        with torch.no_grad():
            llm.runner.loaded.model.load_weights(iter(weights_from.state_dict().items()))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def run(prompts: Prompts) -> Outputs:
        # Repeats reuse the same prompts: drop the prefix cache so no run is served from the
        # previous one (microseconds; there is nothing to recompute).
        llm.core.kv_cache.pool.reset_prefix_cache()
        outputs = llm.generate(prompts, params)
        hits = sum(out.num_cached_tokens for out in outputs)
        if hits:
            raise RuntimeError(f"ours: {hits} prompt tokens came from the prefix cache")
        return [out.token_ids for out in outputs]

    return run


# --- report ---------------------------------------------------------------------------------


def greedy_agreement(ours: Outputs, reference: Outputs, first_n: int) -> dict[str, object]:
    """How long our greedy tokens match the reference, per prompt (bf16 may diverge later)."""
    prefix_lengths = []
    for a, b in zip(ours, reference, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix_lengths.append(n)
    return {
        "num_prompts": len(prefix_lengths),
        "first_n": first_n,
        "prompts_matching_first_n": sum(n >= first_n for n in prefix_lengths),
        "matching_prefix_lengths": prefix_lengths,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Offline throughput of protoserve LLM.generate vs transformers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", default=None,
                        help="benchmark checkpoint directory (built there if missing)")
    parser.add_argument("--shape", choices=SHAPE_NAMES, default="bench-100m",
                        help="bench-100m: the cached ~100M checkpoint; others: random weights "
                             "from a config.json alone")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both engines)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                        help="ours on CUDA: the transformers peers share the device")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="static batch size for transformers generate (default: num-prompts)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per contender; median reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--check-tokens", type=int, default=8,
                        help="leading tokens counted in the greedy-agreement report")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["hf-generate", "hf-generate-batch"],
                        help="contenders to leave out")
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args()


def print_table(results: list[RunResult]) -> None:
    print(f"\n{'contender':<26}{'wall s median':>14}{'best':>8}{'output tok/s':>14}"
          f"{'total tok/s':>13}{'out tok/s best':>16}")
    for result in results:
        if result.skipped is not None:
            print(f"{result.name:<26}  skipped: {result.skipped}")
            continue
        row = result.summary()
        print(
            f"{result.name:<26}{row['wall_s_median']:>14.2f}{row['wall_s_best']:>8.2f}"
            f"{row['output_tokens_per_s']:>14.1f}{row['total_tokens_per_s']:>13.1f}"
            f"{row['output_tokens_per_s_best']:>16.1f}"
        )


def build_contenders(
    args: argparse.Namespace, model_dir: Path
) -> tuple[list[Contender], list[RunResult]]:
    """Every contender is loaded before any is timed, so the timed runs can be interleaved."""
    if args.shape in CONFIG_ONLY_SHAPES:
        # One set of random weights for both engines: transformers draws them, ours copies.
        model = load_hf_model(model_dir, args.device, seed=SEED)
        ours = make_ours(model_dir, args, weights_from=model)
    else:
        ours = make_ours(model_dir, args)
        model = load_hf_model(model_dir, args.device)
    contenders = [Contender(RunResult("protoserve LLM.generate"), ours)]
    skipped: list[RunResult] = []
    hf_batch_size = args.hf_batch_size or args.num_prompts
    name = f"hf generate (bs {hf_batch_size})"
    if "hf-generate" in args.skip:
        skipped.append(RunResult(name, skipped="--skip"))
    else:
        run = make_hf_generate(model, args.output_len, hf_batch_size)
        contenders.append(Contender(RunResult(name), run))
    name = "hf generate_batch"
    if "hf-generate-batch" in args.skip:
        skipped.append(RunResult(name, skipped="--skip"))
    else:
        cb_run = make_hf_generate_batch(
            model, args.output_len, args.input_len, args.num_prompts, max_batch_tokens=2048
        )
        if isinstance(cb_run, str):
            skipped.append(RunResult(name, skipped=cb_run))
        else:
            contenders.append(Contender(RunResult(name), cb_run))
    return contenders, skipped


def run_all(
    contenders: list[Contender], skipped: list[RunResult], args: argparse.Namespace,
    prompts: Prompts, warmup_prompts: Prompts,
) -> list[Contender]:
    """Warm each contender up, then time them round-robin: on a shared machine the load
    drifts, and interleaving spreads that drift over all contenders alike."""
    active = []
    for contender in contenders:
        print(f"{contender.result.name}: warm-up", flush=True)
        try:
            contender.run(warmup_prompts)
            active.append(contender)
        except Exception as error:  # a peer failing on CPU must not lose the other numbers
            reason = f"{type(error).__name__}: {error}"
            print(f"{contender.result.name}: skipped ({reason})")
            skipped.append(RunResult(contender.result.name, skipped=reason))
    for round_index in range(args.repeats):
        print(f"round {round_index + 1}/{args.repeats}", flush=True)
        for contender in active:
            time_once(contender, prompts, args.output_len)
    return active


def main() -> None:
    args = parse_args()
    # One thread count for every contender, set once: all cores this process may use.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.shape in CONFIG_ONLY_SHAPES:
        if args.device == "cpu":
            # Our CPU bf16 path packs the weights at load, so they cannot be copied in later.
            raise SystemExit(f"--shape {args.shape} runs on --device cuda")
        model_dir = ensure_shape_dir(args.shape, args.model_dir)
    else:
        model_dir = ensure_bench_model(args.model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)
    # Different prompts for warm-up, so the timed runs cannot hit anything it cached.
    warmup_prompts = make_prompts(2, args.input_len, vocab_size, args.seed + 1)
    machine = machine_info()
    print(
        f"model {model_dir} ({count_parameters(model_dir) / 1e6:.1f}M params, bf16); "
        f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out; "
        f"repeats {args.repeats}\n{machine}",
        flush=True,
    )
    contenders, skipped = build_contenders(args, model_dir)
    active = run_all(contenders, skipped, args, prompts, warmup_prompts)
    machine["loadavg_end"] = os.getloadavg()
    results = [c.result for c in active] + skipped
    print_table(results)

    ours = active[0].result
    ratios: dict[str, dict[str, float]] = {}
    for other in active[1:]:
        ratios[f"ours / {other.result.name}"] = {
            "median": round(other.result.median_s / ours.median_s, 2),
            "best": round(other.result.best_s / ours.best_s, 2),
        }
    for label, ratio in ratios.items():
        print(f"output throughput {label}: {ratio['median']:.2f}x (median), "
              f"{ratio['best']:.2f}x (best)")

    agreement: dict[str, object] = {}
    first_n = min(args.check_tokens, args.output_len)
    for i, first in enumerate(active):
        for second in active[i + 1 :]:
            label = f"{first.result.name} vs {second.result.name}"
            check = greedy_agreement(first.outputs, second.outputs, first_n)
            agreement[label] = check
            prefixes = check["matching_prefix_lengths"]
            print(
                f"greedy agreement {label}: {check['prompts_matching_first_n']}/"
                f"{check['num_prompts']} prompts match the first {first_n} tokens; "
                f"matching prefix median {statistics.median(prefixes)} of {args.output_len} "
                f"(min {min(prefixes)}, max {max(prefixes)})"
            )

    if args.json:
        report = {
            "machine": machine,
            "model": {
                "dir": str(model_dir),
                "parameters": count_parameters(model_dir),
                "shape": args.shape,
                "device": args.device,
                "dtype": "bfloat16",
            },
            "workload": {
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "hf_batch_size": args.hf_batch_size or args.num_prompts,
                "repeats": args.repeats,
                "seed": args.seed,
            },
            "results": [r.summary() for r in results],
            "output_throughput_ratios": ratios,
            "greedy_agreement": agreement,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
