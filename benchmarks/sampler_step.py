"""Micro-benchmark: wall time of one `Sampler.sample()` call for a few batch shapes.

Run from the repository root:
    .venv/bin/python -m benchmarks.sampler_step [--batch-size 64] [--vocab-size 32000]
On a machine shared with other work, OMP_NUM_THREADS=1 gives steadier numbers.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from engine.core.batch import ScheduledRequest
from engine.sampling import Sampler
from engine.sampling_params import SamplingParams


def _requests(
    num_rows: int, make_params: Callable[[int], SamplingParams]
) -> list[ScheduledRequest]:
    prompt_ids = list(range(1, 129))
    return [
        ScheduledRequest(
            request_id=f"req-{row}",
            token_ids=prompt_ids,
            start=len(prompt_ids) - 1,
            num_tokens=1,
            block_ids=[0],
            sample=True,
            sampling_params=make_params(row),
            num_prompt_tokens=len(prompt_ids),
        )
        for row in range(num_rows)
    ]


SCENARIOS: dict[str, Callable[[int], SamplingParams]] = {
    "all-greedy": lambda row: SamplingParams(temperature=0.0),
    "all-sampled (temperature+top_k+top_p)": lambda row: SamplingParams(
        temperature=0.8, top_k=50, top_p=0.95
    ),
    "all-sampled (temperature+top_p, no top_k)": lambda row: SamplingParams(
        temperature=0.8, top_p=0.95
    ),
    "mixed: 1/2 seeded, 1/4 unseeded, 1/4 greedy": lambda row: SamplingParams(
        temperature=0.0 if row % 4 == 3 else 0.8,
        top_k=50,
        top_p=0.95,
        seed=row if row % 2 == 0 else None,
    ),
    "all-sampled + penalties (128-token contexts)": lambda row: SamplingParams(
        temperature=0.8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2
    ),
    "all-greedy + logprobs=5": lambda row: SamplingParams(temperature=0.0, logprobs=5),
    "all-sampled (temp+top_k+top_p) + logprobs=5": lambda row: SamplingParams(
        temperature=0.8, top_k=50, top_p=0.95, logprobs=5
    ),
    "all-sampled (temperature only) + logprobs=20": lambda row: SamplingParams(
        temperature=0.8, logprobs=20
    ),
    "all-sampled + min_tokens + bad_words (2 words)": lambda row: SamplingParams(
        temperature=0.8, min_tokens=1000, bad_words_token_ids=((5,), (7, 9))
    ),
}


def _time_per_call_ms(
    sampler: Sampler, logits: torch.Tensor, requests: list[ScheduledRequest], num_iters: int
) -> float:
    for _ in range(3):
        sampler.sample(logits, requests)
    timings = []
    for _ in range(num_iters):
        start = time.perf_counter()
        sampler.sample(logits, requests)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=50, help="timed calls per scenario")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--logit-scale",
        type=float,
        default=3.0,
        help="logits are N(0, scale^2): small scales give flat distributions with long top_p "
        "nuclei, large ones peaked distributions",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    logits = torch.randn(args.batch_size, args.vocab_size, device=device) * args.logit_scale
    print(
        f"batch {args.batch_size}, vocab {args.vocab_size}, logit scale {args.logit_scale}, "
        f"device {device}, "
        f"{torch.get_num_threads()} threads; median of {args.iters} calls"
    )
    for name, make_params in SCENARIOS.items():
        sampler = Sampler(device)
        requests = _requests(args.batch_size, make_params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        milliseconds = _time_per_call_ms(sampler, logits, requests, args.iters)
        print(f"  {name:<48} {milliseconds:8.3f} ms")


if __name__ == "__main__":
    main()
