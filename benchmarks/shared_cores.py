"""Decode speed when the cores are shared: the kernels' work pool against at::parallel_for.

On a 2-core machine the engine's compute threads share the cores with the serving processes
and with whatever else runs there. With OpenMP's static split every parallel region waits for
its slowest thread, so a thread that lost its core stalls the whole step; the work pool
(csrc/cpu/work_pool.cpp) lets the threads that are running take the chunks of one that is
not. This runs the same offline workload both ways, alternating, on a quiet machine and with
`--busy N` competing processes (each a pure-Python busy loop, like a neighbour's job), and
reports output tokens/s per setting.

Run from the repository root:
    .venv/bin/python -m benchmarks.shared_cores                   # quiet, then one busy process
    .venv/bin/python -m benchmarks.shared_cores --busy 0 1 2 --batch-sizes 1 16 --rounds 3
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from collections.abc import Iterator

import torch

from benchmarks.bench_model import ensure_bench_model
from benchmarks.machine import machine_info
from engine import ops
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
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


def run_once(llm: LLM, batch_size: int, input_len: int, output_len: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 30000, (input_len,), generator=gen).tolist()
               for _ in range(batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(out.token_ids) for out in outputs) / elapsed


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
    args = parser.parse_args()

    module = ops._cpu_module()
    if module is None or not hasattr(module, "set_work_pool"):
        raise SystemExit("the native CPU ops (with the work pool) are not available here")
    torch.set_num_threads(args.threads)
    model_dir = ensure_bench_model()
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=1 << 30,
              max_num_seqs=max(args.batch_sizes))
    print(machine_info())
    print(f"model {model_dir}; {args.threads} threads; {args.input_len} in / "
          f"{args.output_len} out; {args.rounds} alternated rounds")
    run_once(llm, max(args.batch_sizes), args.input_len, 8, seed=0)  # warm-up
    results: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    for busy in args.busy:
        with busy_processes(busy):
            for round_index in range(args.rounds):
                for batch_size in args.batch_sizes:
                    # Alternate which goes first, so a drift in load is shared.
                    order = ["pool", "openmp"] if round_index % 2 == 0 else ["openmp", "pool"]
                    for name in order:
                        module.set_work_pool(name == "pool")
                        results[(busy, batch_size, name)].append(run_once(
                            llm, batch_size, args.input_len, args.output_len, seed=round_index))
    module.set_work_pool(True)
    print(f"{'busy':>4} {'batch':>5} {'pool tok/s':>11} {'openmp tok/s':>13} {'ratio':>6}")
    for busy in args.busy:
        for batch_size in args.batch_sizes:
            pool = statistics.median(results[(busy, batch_size, "pool")])
            openmp = statistics.median(results[(busy, batch_size, "openmp")])
            print(f"{busy:>4} {batch_size:>5} {pool:>11.1f} {openmp:>13.1f} "
                  f"{pool / openmp:>5.2f}x")


if __name__ == "__main__":
    main()
