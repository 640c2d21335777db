"""Decode speed with n-gram speculative decoding vs without, batch 1 and batch 8, on a
repetitive workload and on random text, both engines in this process on the same model.

    .venv/bin/python -m benchmarks.spec_decode                       # the 100M bench model
    .venv/bin/python -m benchmarks.spec_decode --model-dir DIR --new-tokens 64 --repeats 1

Workloads:
  repetitive  each prompt is a "document" repeated (an edit or summary quoting its input),
              decoded greedily: a trained model copies it, the n-grams predict the copy.
  random      random-token prompts sampled at temperature 1: the n-grams rarely match, and
              requests whose drafts keep failing back off (the target: >= 0.95x).

Decode time is a generate of --new-tokens tokens minus a generate of one token (the prefill),
the median of --repeats runs. The acceptance rate and mean accepted length come from the
engine's own counters, so a random-weight model's numbers can be read for what they are: its
speed-up follows from how often it repeats itself, not from the method alone.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from benchmarks.bench_model import DEFAULT_MODEL_DIR, ensure_bench_model
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


def _prompts(workload: str, batch: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    if workload == "repetitive":
        documents = [[rng.randrange(1, vocab) for _ in range(48)] for _ in range(batch)]
        return [doc * 3 for doc in documents]
    return [[rng.randrange(1, vocab) for _ in range(144)] for _ in range(batch)]


def _params(workload: str, new_tokens: int) -> tuple[SamplingParams, SamplingParams]:
    temperature = 0.0 if workload == "repetitive" else 1.0
    return (
        SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True, seed=1),
        SamplingParams(temperature=temperature, max_tokens=1, ignore_eos=True, seed=1),
    )


def _decode_seconds(llm: LLM, prompts: list[list[int]], workload: str, new_tokens: int,
                    repeats: int) -> float:
    full, prefill = _params(workload, new_tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, prefill)
        middle = time.perf_counter()
        llm.generate(prompts, full)
        end = time.perf_counter()
        times.append(max((end - middle) - (middle - start), 1e-9))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    model_dir = ensure_bench_model(args.model_dir) if args.model_dir == DEFAULT_MODEL_DIR \
        else args.model_dir
    common = dict(dtype=args.dtype, kv_cache_memory=1 << 30)
    plain = LLM(str(model_dir), **common)
    spec = LLM(str(model_dir), **common, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
        "prompt_lookup_max": 4, "prompt_lookup_min": 1})
    vocab = plain.facts.vocab_size
    counters = spec.core.scheduler.spec
    assert counters is not None
    print(f"model {model_dir}, {args.dtype}, {args.new_tokens} new tokens, "
          f"k={args.num_speculative_tokens}")
    print(f"{'workload':<11} {'batch':>5} {'plain tok/s':>12} {'spec tok/s':>11} "
          f"{'speed-up':>9} {'accept':>7} {'mean len':>9}")
    for workload in ("repetitive", "random"):
        for batch in args.batches:
            prompts = _prompts(workload, batch, vocab, seed=batch)
            for llm in (plain, spec):  # warm-up: first-call costs stay out of the timings
                llm.generate(prompts[:1], _params(workload, 4)[0])
            before = counters.stats.copy()
            t_plain = _decode_seconds(plain, prompts, workload, args.new_tokens, args.repeats)
            t_spec = _decode_seconds(spec, prompts, workload, args.new_tokens, args.repeats)
            after = counters.stats
            drafts = after.num_drafts - before.num_drafts
            proposed = after.num_draft_tokens - before.num_draft_tokens
            accepted = after.num_accepted_tokens - before.num_accepted_tokens
            tokens = batch * (args.new_tokens - 1)
            print(f"{workload:<11} {batch:>5} {tokens / t_plain:>12.1f} {tokens / t_spec:>11.1f} "
                  f"{t_plain / t_spec:>8.2f}x {accepted / proposed if proposed else 0:>7.2f} "
                  f"{1 + accepted / drafts if drafts else 0:>9.2f}")


if __name__ == "__main__":
    main()
