"""Draft-model proposal cost: all requests' draft steps in one batch (`propose_batch`, what
the engine does) against one request at a time (`propose` per request), same draft, same
tokens, batch 1 and batch 8.

    .venv/bin/python -m benchmarks.draft_batch                      # the 100M bench model
    .venv/bin/python -m benchmarks.draft_batch --draft-dir DIR --steps 8

Each step proposes k drafts for every request after its context grew by one accepted token
(the draft's KV is reused, so a step computes k new positions per request); the median of
the steps' wall times is reported, in milliseconds per step.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_model import DEFAULT_MODEL_DIR, ensure_bench_model
from engine.spec_decode.draft_model import DraftModelProposer


def _run(proposer: DraftModelProposer, contexts: dict[str, list[int]], k: int, steps: int,
         batched: bool, tag: str) -> float:
    times = []
    for step in range(steps):
        for tokens in contexts.values():
            tokens.append(7 + step)  # one accepted token since the last proposal
        started = time.perf_counter()
        if batched:
            proposer.propose_batch({f"{tag}{rid}": (tokens, k) for rid, tokens in contexts.items()})
        else:
            for rid, tokens in contexts.items():
                proposer.propose(f"{tag}{rid}", tokens, k)
        times.append(time.perf_counter() - started)
    for rid in contexts:
        proposer.forget(f"{tag}{rid}")
    return statistics.median(times[1:]) * 1e3  # the first step prefills the contexts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="the draft model (default: the 100M bench model)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the draft's dtype (default: bfloat16)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4,
                        help="drafts per request and step (default: 4)")
    parser.add_argument("--steps", type=int, default=6, help="steps timed (default: 6)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8],
                        help="requests per step (default: 1 8)")
    args = parser.parse_args()
    draft_dir = ensure_bench_model(args.draft_dir) if args.draft_dir == DEFAULT_MODEL_DIR \
        else args.draft_dir
    proposer = DraftModelProposer(str(draft_dir), getattr(torch, args.dtype), "cpu",
                                  max_num_seqs=max(args.batches))
    vocab = proposer.runner.loaded.model.dims.vocab_size
    rng = random.Random(0)
    k = args.num_speculative_tokens
    for batch in args.batches:
        row = {}
        for batched in (False, True):
            contexts = {str(i): [rng.randrange(1, vocab) for _ in range(96)]
                        for i in range(batch)}
            row[batched] = _run(proposer, contexts, k, args.steps + 1, batched,
                                f"b{batch}{batched}-")
        print(f"batch {batch}: one request at a time {row[False]:.1f} ms/step, "
              f"batched {row[True]:.1f} ms/step ({row[False] / row[True]:.2f}x), k={k}")


if __name__ == "__main__":
    main()
