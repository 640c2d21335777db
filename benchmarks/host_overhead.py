"""Where one engine step's time goes at a given batch size: host work vs model compute.

Run from the repository root:
    .venv/bin/python -m benchmarks.host_overhead                     # batch 64, greedy
    .venv/bin/python -m benchmarks.host_overhead --batch-size 64 --temperature 0.8 --top-p 0.9

Runs the offline engine on the benchmark model (benchmarks/bench_model.py) with every request
decoding at once, times each phase of the steady decode steps with wrappers around the engine's
own functions (nothing is reimplemented), and prints the median per step:
    schedule     Scheduler.schedule (admission, KV block allocation)
    inputs       prepare_inputs (flattened ids, positions, slot mapping, block tables)
    forward      the model's forward pass (our kernels)
    logits       the LM head over the sampling rows
    sample       Sampler.sample_with_logprobs (penalties, masks, top-k/p, draws)
    update       Scheduler.update_from_output (append tokens, stop checks, outputs, frees)
host = step - forward - logits: the work the target "<= 1 ms per step at batch 64" is about.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from benchmarks.bench_model import ensure_bench_model
from engine.frontend.llm import LLM
from engine.runner import model_runner
from engine.sampling_params import SamplingParams

PHASES = ("schedule", "inputs", "forward", "logits", "sample", "update")


class PhaseTimer:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start

        return timed

    def end_step(self, total: float) -> None:
        self.current["step"] = total
        self.steps.append(dict(self.current))
        self.current.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 disables")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    args = parser.parse_args()

    llm = LLM(str(ensure_bench_model(args.model_dir)), dtype=args.dtype,
              kv_cache_memory=1 << 30, max_num_seqs=max(args.batch_size, 1))
    core, runner = llm.core, llm.runner
    timer = PhaseTimer()
    scheduler = core.scheduler
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)  # type: ignore[method-assign]
    scheduler.update_from_output = timer.wrap(  # type: ignore[method-assign]
        "update", scheduler.update_from_output)
    model = runner.loaded.model
    model.forward = timer.wrap("forward", model.forward)  # type: ignore[method-assign]
    model.compute_logits = timer.wrap("logits", model.compute_logits)  # type: ignore[method-assign]
    runner.sampler.sample_with_logprobs = timer.wrap(  # type: ignore[method-assign]
        "sample", runner.sampler.sample_with_logprobs)
    model_runner.prepare_inputs = timer.wrap("inputs", model_runner.prepare_inputs)
    step = core.step

    def timed_step() -> list[Any]:
        start = time.perf_counter()
        outputs = step()
        timer.end_step(time.perf_counter() - start)
        return outputs

    core.step = timed_step  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=args.steps, ignore_eos=True, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=0,
                            repetition_penalty=args.repetition_penalty)
    prompts = [[3 + (7 * i + j) % 30000 for j in range(args.prompt_len)]
               for i in range(args.batch_size)]
    llm.generate(prompts, params)  # warm-up (kernels, allocator)
    timer.steps.clear()
    llm.generate([[t + 1 for t in p] for p in prompts], params)
    # Steady decode: every request past prefill, none finished yet.
    decode_steps = timer.steps[2:-1]
    medians = {name: statistics.median(s.get(name, 0.0) for s in decode_steps) * 1e3
               for name in (*PHASES, "step")}
    host = statistics.median(
        (s["step"] - s.get("forward", 0.0) - s.get("logits", 0.0)) * 1e3 for s in decode_steps)
    print(f"batch {args.batch_size}, {len(decode_steps)} decode steps, {args.dtype}, "
          f"temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}")
    print("median ms/step: " + "  ".join(f"{name} {medians[name]:.3f}" for name in PHASES))
    print(f"step {medians['step']:.2f} ms; host (step - forward - logits) {host:.3f} ms")


if __name__ == "__main__":
    main()
