"""Tensor parallelism on one CPU socket: TP=2 with one thread per rank against TP=1 with two
threads (and with one), in the same run, and where each rank's step time goes (compute vs
collectives). `--pipeline`: PP=2 with micro-batches (stages overlap) against PP=2 passing each
step whole against one process, likewise.

Run from the repository root (on a quiet machine: the figures of a shared one mean little):
    .venv/bin/python -m benchmarks.tensor_parallel                   # batch 4, 64 steps
    .venv/bin/python -m benchmarks.tensor_parallel --batch-size 16 --steps 128 --rounds 3
    .venv/bin/python -m benchmarks.tensor_parallel --pipeline --batch-size 8 --rounds 3
        (--prefill-len 512: prompt tokens per sequence of its prefill rounds)

Both configurations decode the benchmark model (benchmarks/bench_model.py) from the same
prompts; how many sequences agree token for token is printed (bfloat16 rounding may differ).
Rank 0's split is measured here (its step wall time and CollectiveClock,
engine/distributed/group.py); each other rank logs its own at shutdown ("rank N: ... s busy,
... s of it in ... collectives"). A rank's collective time includes waiting for a slower
rank, so on a shared machine it mixes communication with load imbalance.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from benchmarks.bench_model import ensure_bench_model
from engine.distributed.group import CollectiveClock
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


def run(model_dir: str, tp: int, threads: int, args: argparse.Namespace, pp: int = 1,
        micro_batches: int | None = None) -> list[list[int]]:
    """Decode rounds (and with --pipeline, prefill rounds); the last round's tokens."""
    torch.set_num_threads(threads)
    prompts = [[7 + i] * args.prompt_len for i in range(args.batch_size)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    name = f"TP={tp}" if pp == 1 else f"PP={pp} x {micro_batches or pp} micro-batch(es)"
    with LLM(model_dir, dtype=args.dtype, kv_cache_memory=1 << 29,
             tensor_parallel_size=tp, pipeline_parallel_size=pp,
             pipeline_micro_batches=micro_batches) as llm:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        tokens: list[list[int]] = []
        for round_index in range(args.rounds):
            CollectiveClock.reset()
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - start
            tokens = [o.token_ids for o in outputs]
            print(f"{name} x {threads} thread(s)/rank, round {round_index}: "
                  f"{args.batch_size * args.steps / elapsed:8.1f} tok/s  "
                  f"rank 0: {elapsed:.2f} s, {CollectiveClock.seconds:.2f} s in "
                  f"{CollectiveClock.calls} collectives "
                  f"({100 * CollectiveClock.seconds / elapsed:.0f}%)", flush=True)
            if args.pipeline:
                prefill(llm, name, threads, round_index, args)
    return tokens


def prefill(llm: LLM, name: str, threads: int, round_index: int,
            args: argparse.Namespace) -> None:
    """Prompts of --prefill-len tokens, one output token each: steps of many rows, where
    micro-batches are big enough to pay. A first token of their own per round: no prefix
    cache hits (block hashes chain from the first token)."""
    first = 100 + args.batch_size * round_index
    prompts = [[first + i] + [7] * (args.prefill_len - 1) for i in range(args.batch_size)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1))
    elapsed = time.perf_counter() - start
    print(f"{name} x {threads} thread(s)/rank, round {round_index}: prefill "
          f"{args.batch_size * args.prefill_len / elapsed:8.1f} prompt tok/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--pipeline", action="store_true",
                        help="compare pipeline stages (micro-batched or not) instead of TP")
    parser.add_argument("--prefill-len", type=int, default=512,
                        help="prompt tokens per sequence of --pipeline's prefill rounds")
    args = parser.parse_args()
    # The other ranks' own step split arrives as their INFO line at shutdown.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("engine", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("engine.distributed.worker").setLevel(logging.INFO)
    model_dir = str(ensure_bench_model())
    if args.pipeline:
        run_pipeline(model_dir, args)
        return
    single = run(model_dir, 1, 2, args)
    split = run(model_dir, 2, 1, args)
    # One process on one thread too: on a loaded host two OpenMP threads can collapse (each
    # barrier waits for a preempted thread), which would flatter the TP=2 ratio.
    run(model_dir, 1, 1, args)
    # float32 must agree exactly (tests/engine/distributed); in bfloat16 the ranks' partial
    # sums round differently from one whole sum, so a near-tie may flip.
    same = sum(a == b for a, b in zip(single, split))
    print(f"{same}/{len(single)} sequences with the same greedy tokens; TP=1 takes the fused "
          "decode path where it applies, TP=2 the per-op path with two all_reduces per layer")


def run_pipeline(model_dir: str, args: argparse.Namespace) -> None:
    """PP=2 (one thread per stage) micro-batched, then passing each step whole, then one
    process on two threads and on one. Rank 0's collective time counts the logits gather
    only: its wait for the last stage's hidden states is in its step time. Decode steps of
    fewer than 2 x 64 rows pass whole either way (--pipeline-micro-batch-min-tokens); the
    prefill rounds show the overlap."""
    overlapped = run(model_dir, 1, 1, args, pp=2)
    whole = run(model_dir, 1, 1, args, pp=2, micro_batches=1)
    single = run(model_dir, 1, 2, args)
    run(model_dir, 1, 1, args)
    same = sum(a == b == c for a, b, c in zip(overlapped, whole, single))
    print(f"{same}/{len(single)} sequences with the same greedy tokens in all three; PP=1 "
          "takes the fused decode path where it applies, the stages the per-op path")


if __name__ == "__main__":
    main()
