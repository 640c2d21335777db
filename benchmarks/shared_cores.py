"""Decode speed when the cores are shared: the kernels' work pool against at::parallel_for.

On a 2-core machine the engine's compute threads share the cores with the serving processes
and with whatever else runs there. With OpenMP's static split every parallel region waits for
its slowest thread, so a thread that lost its core stalls the whole step; the work pool
(csrc/cpu/work_pool.cpp) lets the threads that are running take the chunks of one that is
not. Each arm runs the same offline workload in a fresh process (OpenMP reads its wait policy
once, at start), arms alternated, quiet and with `--busy N` competing processes (each a
pure-Python busy loop, like a neighbour's job):
    pool+passive   the work pool, OMP_WAIT_POLICY=PASSIVE: what engine-serve's core runs
    pool           the work pool, OpenMP's default policy (an offline LLM in a plain process)
    openmp         PROTOSERVE_WORK_POOL=0, OpenMP's default policy: the kernels before the pool

Run from the repository root:
    .venv/bin/python -m benchmarks.shared_cores                   # quiet, then one busy process
    .venv/bin/python -m benchmarks.shared_cores --busy 0 1 2 --batch-sizes 1 16 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

ARMS: dict[str, dict[str, str]] = {
    "pool+passive": {"PROTOSERVE_WORK_POOL": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "pool": {"PROTOSERVE_WORK_POOL": "1"},
    "openmp": {"PROTOSERVE_WORK_POOL": "0"},
}


def _spin(stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    while not stop.is_set():
        for _ in range(100_000):
            pass


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy until the block ends."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    processes = [context.Process(target=_spin, args=(stop,), daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    try:
        time.sleep(0.5 if count else 0.0)  # let them take their cores
        yield
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=10)


def child(args: argparse.Namespace) -> None:
    """One arm in this process: prints {batch size: output tok/s} as JSON."""
    import torch

    from benchmarks.bench_model import ensure_bench_model
    from engine.frontend.llm import LLM
    from engine.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(str(ensure_bench_model()), dtype="bfloat16", kv_cache_memory=1 << 30,
              max_num_seqs=max(args.batch_sizes))
    gen = torch.Generator().manual_seed(args.seed)
    rates = {}
    for index, batch_size in enumerate([max(args.batch_sizes), *args.batch_sizes]):
        prompts = [torch.randint(100, 30000, (args.input_len,), generator=gen).tolist()
                   for _ in range(batch_size)]
        new_tokens = 8 if index == 0 else args.output_len  # the first is the warm-up
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        if index:
            rates[batch_size] = sum(len(out.token_ids) for out in outputs) / elapsed
    print(json.dumps(rates))


def run_arm(arm: str, args: argparse.Namespace, seed: int) -> dict[int, float]:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env.update(ARMS[arm])
    command = [sys.executable, "-m", "benchmarks.shared_cores", "--child", "--seed", str(seed),
               "--threads", str(args.threads), "--input-len", str(args.input_len),
               "--output-len", str(args.output_len), "--batch-sizes",
               *map(str, args.batch_sizes)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1],
                        help="competing busy processes per setting (default: 0 1)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16],
                        help="concurrent sequences (default: 1 16)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: 32)")
    parser.add_argument("--output-len", type=int, default=128,
                        help="generated tokens per sequence (default: 128)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated rounds; medians reported (default: 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="compute threads, torch.set_num_threads (default: 2)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help=f"settings compared (default: {' '.join(ARMS)})")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from benchmarks.bench_model import ensure_bench_model
    from benchmarks.machine import machine_info

    print(machine_info())
    print(f"model {ensure_bench_model()}; {args.threads} threads; {args.input_len} in / "
          f"{args.output_len} out; {args.rounds} alternated rounds; a fresh process per run")
    results: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    for busy in args.busy:
        with busy_processes(busy):
            for round_index in range(args.rounds):
                # Rotate which arm goes first, so a drift in load is shared.
                shift = round_index % len(args.arms)
                for arm in args.arms[shift:] + args.arms[:shift]:
                    for batch_size, rate in run_arm(arm, args, round_index).items():
                        results[(busy, batch_size, arm)].append(rate)
    header = "".join(f"{arm + ' tok/s':>20}" for arm in args.arms)
    print(f"{'busy':>4} {'batch':>5}{header}   ratios to {args.arms[-1]}")
    for busy in args.busy:
        for batch_size in args.batch_sizes:
            medians = [statistics.median(results[(busy, batch_size, arm)]) for arm in args.arms]
            cells = "".join(f"{value:>20.1f}" for value in medians)
            ratios = " / ".join(f"{value / medians[-1]:.2f}x" for value in medians[:-1])
            print(f"{busy:>4} {batch_size:>5}{cells}   {ratios}")


if __name__ == "__main__":
    main()
