"""Where a speculative step's time goes, next to a plain decode step's: both engines in this
process on the same model, the same prompts, timed phase by phase (A/B, so a busy machine
slows both alike).

    .venv/bin/python -m benchmarks.spec_decode_profile --batches 1 8 --new-tokens 64

Phases, summed over the steps of one generate (its prompt step included) and divided by its
step count; then the runner's time over the steps of decode rows alone, which is the
speed-up's measure (both engines emit the same number of tokens in them):
  schedule   the scheduler's step (for the speculative engine: the proposer's lookup too)
  propose    the proposer alone (inside schedule)
  prep       flattening the batch into model inputs
  forward    the decoder layers (GEMMs and attention)
  logits     the vocabulary projection
  sample     the sampler, or for steps with drafts the verifier (rejection / acceptance)
  update     the scheduler's bookkeeping after the step (appending tokens, rollback)

`--forward-only`: the decoder forward alone on synthetic steps (a context of --context
tokens per request), plain decode vs verification of k drafts as decode rows vs the same
verification as prefill-shaped rows; the minimum over interleaved repeats, which a busy
machine perturbs least.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_model import DEFAULT_MODEL_DIR, ensure_bench_model
from benchmarks.spec_decode import _params, _prompts
from engine.frontend.llm import LLM
from engine.core.batch import ScheduledRequest, ScheduledBatch
from engine.runner import input_prep, model_runner
from engine.sampling_params import SamplingParams
from engine.spec_decode import runner_step

PHASES = ("schedule", "propose", "prep", "forward", "logits", "sample", "update")


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.tokens = 0
        # Steps of decode rows only (no prompt chunk), timed around the runner.
        self.decode_steps = 0
        self.decode_seconds = 0.0

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed


def instrument(llm: LLM, clock: PhaseClock) -> None:
    """Wrap the phases of `llm`'s steps (instance attributes: only this engine is timed)."""
    core, runner = llm.core, llm.runner
    scheduler = core.scheduler
    scheduler.schedule = clock.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = clock.wrap(  # type: ignore[method-assign]
        "update", scheduler.update_from_output)
    if scheduler.spec is not None:
        proposer = scheduler.spec.proposer
        proposer.propose = clock.wrap("propose", proposer.propose)  # type: ignore[method-assign]
    model = runner.loaded.model
    model.forward = clock.wrap("forward", model.forward)  # type: ignore[method-assign]
    model.compute_logits = clock.wrap("logits", model.compute_logits)  # type: ignore[method-assign]
    sampler = runner.sampler
    sampler.sample_with_logprobs = clock.wrap(  # type: ignore[method-assign]
        "sample", sampler.sample_with_logprobs)
    execute = runner.execute

    def counted(batch: Any) -> Any:
        clock.steps += 1
        clock.tokens += batch.num_scheduled_tokens
        start = time.perf_counter()
        try:
            return execute(batch)
        finally:
            if all(r.num_tokens == 1 + len(r.draft_token_ids) for r in batch.requests):
                clock.decode_steps += 1
                clock.decode_seconds += time.perf_counter() - start
    runner.execute = counted  # type: ignore[method-assign]


def _synthetic_batch(batch: int, context: int, drafts: int, block_size: int) -> ScheduledBatch:
    params = SamplingParams(temperature=0.0)
    blocks_per_request = -(-(context + drafts) // block_size)
    requests = []
    for index in range(batch):
        blocks = list(range(index * blocks_per_request, (index + 1) * blocks_per_request))
        requests.append(ScheduledRequest(
            f"r{index}", [7] * context, context - 1, 1 + drafts, blocks, True, params,
            context - 8, draft_token_ids=[11] * drafts,
        ))
    return ScheduledBatch(requests, batch * (1 + drafts))


def forward_only(llm: LLM, batches: list[int], context: int, drafts: int, repeats: int) -> None:
    runner = llm.runner
    model = runner.loaded.model
    decode_limit = input_prep.MAX_DECODE_QUERY_TOKENS
    variants = {"decode": (0, decode_limit), f"verify k={drafts} decode-rows": (drafts, 64),
                f"verify k={drafts} prefill-rows": (drafts, 1)}
    for batch in batches:
        best = {name: float("inf") for name in variants}
        for _ in range(repeats):
            for name, (num_drafts, limit) in variants.items():
                input_prep.MAX_DECODE_QUERY_TOKENS = limit
                steps = _synthetic_batch(batch, context, num_drafts, runner.block_size)
                with torch.inference_mode():
                    inputs = input_prep.prepare_inputs(steps, runner.block_size, runner.device)
                    start = time.perf_counter()
                    model(inputs.input_ids, inputs.positions, runner.kv_caches,
                          inputs.attn_metadata)
                    best[name] = min(best[name], time.perf_counter() - start)
        input_prep.MAX_DECODE_QUERY_TOKENS = decode_limit
        print(f"batch {batch}, context {context}: forward ms (min of {repeats}): " +
              "  ".join(f"{name}={1e3 * t:.2f}" for name, t in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--workloads", nargs="+", default=["repetitive"])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is steadier on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = ensure_bench_model(args.model_dir) if args.model_dir == DEFAULT_MODEL_DIR \
        else args.model_dir
    common = dict(dtype="bfloat16", kv_cache_memory=1 << 30)
    if args.forward_only:
        forward_only(LLM(str(model_dir), **common), args.batches, args.context,
                     args.num_speculative_tokens, args.repeats)
        return
    engines = {
        "plain": LLM(str(model_dir), **common),
        "spec": LLM(str(model_dir), **common, speculative_config={
            "method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
    }
    # The verifier is a module function the runner imports by name.
    original_verify = runner_step.verify_drafts
    original_prep = model_runner.prepare_inputs
    vocab = engines["plain"].facts.vocab_size
    for workload in args.workloads:
        for batch in args.batches:
            prompts = _prompts(workload, batch, vocab, seed=batch)
            full, _ = _params(workload, args.new_tokens)
            for name, llm in engines.items():
                llm.generate(prompts[:1], _params(workload, 4)[0])  # warm-up
                clock = PhaseClock()
                instrument(llm, clock)
                runner_step.verify_drafts = clock.wrap("sample", original_verify)
                model_runner.prepare_inputs = clock.wrap("prep", original_prep)
                start = time.perf_counter()
                llm.generate(prompts, full)
                total = time.perf_counter() - start
                runner_step.verify_drafts = original_verify
                model_runner.prepare_inputs = original_prep
                for attribute in ("schedule", "update_from_output"):
                    delattr(llm.core.scheduler, attribute)
                if llm.core.scheduler.spec is not None:
                    del llm.core.scheduler.spec.proposer.propose
                for attribute in ("forward", "compute_logits"):
                    delattr(llm.runner.loaded.model, attribute)
                del llm.runner.sampler.sample_with_logprobs
                del llm.runner.execute
                per_step = {p: 1e3 * clock.seconds[p] / max(clock.steps, 1) for p in PHASES}
                print(f"{workload:<10} b={batch} {name:<5} decode steps={clock.decode_steps:>4} "
                      f"in {clock.decode_seconds:6.2f}s (runner only)")
                print(f"{workload:<10} b={batch} {name:<5} steps={clock.steps:>4} "
                      f"rows/step={clock.tokens / max(clock.steps, 1):5.1f} "
                      f"total={total:6.2f}s  ms/step: " +
                      " ".join(f"{p}={per_step[p]:.2f}" for p in PHASES))


if __name__ == "__main__":
    main()
