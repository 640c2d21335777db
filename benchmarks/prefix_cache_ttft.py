"""Time to first token for requests that share a long prefix, prefix caching on vs off.

    .venv/bin/python -m benchmarks.prefix_cache_ttft                 # 1024-token shared prefix
    .venv/bin/python -m benchmarks.prefix_cache_ttft --prefix-len 2048 --requests 8

Each request is the shared prefix plus a short unique suffix, generating one token (so the
measured time is the prefill, i.e. the engine-side time to first token). With caching on, one
warm-up request leaves the prefix in the cache and every timed request computes only its
suffix; with caching off every request computes the whole prompt. Both engines run in this
process on the same model, one after the other.
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


def _ttfts(llm: LLM, prompts: list[list[int]]) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        llm.generate([prompt], params)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()

    model_dir = ensure_bench_model(args.model_dir)
    rng = random.Random(0)
    prefix = [rng.randrange(1, 32000) for _ in range(args.prefix_len)]
    prompts = [prefix + [rng.randrange(1, 32000) for _ in range(args.suffix_len)]
               for _ in range(args.requests + 1)]
    results = {}
    for caching in (False, True):
        llm = LLM(str(model_dir), dtype=args.dtype, enable_prefix_caching=caching,
                  kv_cache_memory=1 << 30, max_model_len=args.prefix_len + args.suffix_len + 16)
        _ttfts(llm, prompts[:1])  # warm-up (and, with caching, fills the prefix)
        results[caching] = _ttfts(llm, prompts[1:])
        del llm
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"shared prefix {args.prefix_len} tokens + {args.suffix_len} unique, {args.requests} requests")
    print(f"TTFT median, prefix caching off: {off * 1000:8.1f} ms")
    print(f"TTFT median, prefix caching on:  {on * 1000:8.1f} ms")
    print(f"speed-up: {off / on:.1f}x")


if __name__ == "__main__":
    main()
