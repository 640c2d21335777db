"""Guided-decoding overhead on the offline engine: the same 64-request workload with and
without a JSON-schema constraint, and the first-token latency of a request with a new 5-field
schema on an idle engine (the compile included, nothing cached).

    .venv/bin/python -m benchmarks.guided_overhead [--model DIR] [--max-tokens 64]

The default model is the built-in demo model (random weights, with a tokenizer). Constrained
requests stop when their JSON is complete, so the per-step time is the fair comparison; both
runs also report their total steps and tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy  # noqa: F401  (import before torch, see environment notes)
import torch

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams
from engine.structured import OutputConstraint

NUM_REQUESTS = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 20},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "email", "member", "tags"],
    "additionalProperties": False,
}


def run(llm: LLM, max_tokens: int, constraint: OutputConstraint | None) -> dict[str, float]:
    prompts = [[0, 10 + i % 50, 20 + i % 30, 30] for i in range(NUM_REQUESTS)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens)
              for i in range(NUM_REQUESTS)]
    steps_before = llm.core.num_steps
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, constraints=constraint)
    elapsed = time.perf_counter() - start
    steps = llm.core.num_steps - steps_before
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"seconds": elapsed, "steps": steps, "tokens": tokens,
            "ms_per_step": 1000 * elapsed / steps, "tokens_per_s": tokens / elapsed}


def first_token_latency(llm: LLM, schema: dict) -> tuple[float, float]:
    """(compile ms, first token ms incl. compile) of one request with a never-seen schema."""
    constraint = OutputConstraint(json_schema=json.dumps(schema))
    start = time.perf_counter()
    llm.grammar_compiler.compile(constraint)
    compiled = time.perf_counter()
    llm.generate([[0, 11, 12]], SamplingParams(temperature=1.0, seed=0, max_tokens=1),
                 constraints=constraint)
    done = time.perf_counter()
    return 1000 * (compiled - start), 1000 * (done - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory (default: the demo model)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    model = args.model
    if model is None:
        from engine.demo import ensure_demo_model

        model = str(ensure_demo_model())
    torch.manual_seed(0)
    llm = LLM(model, dtype=args.dtype)
    llm.grammar_compiler.warm_up()  # the tokenizer table, built once per engine
    run(llm, 8, None)  # warm-up of the step path
    constraint = OutputConstraint(json_schema=json.dumps(SCHEMA))
    plain = run(llm, args.max_tokens, None)
    guided = run(llm, args.max_tokens, constraint)
    fresh = dict(SCHEMA, title=f"fresh-{time.time_ns()}")  # a cache miss by construction
    compile_ms, first_ms = first_token_latency(llm, fresh)
    plain_step_ms = first_token_latency_baseline(llm)
    print(f"model {model} ({args.dtype}), {NUM_REQUESTS} requests, max_tokens {args.max_tokens}")
    for name, result in (("unconstrained", plain), ("json schema", guided)):
        print(f"  {name:14s} {result['ms_per_step']:7.2f} ms/step  {result['steps']:4.0f} steps  "
              f"{result['tokens']:6.0f} tokens  {result['tokens_per_s']:8.1f} tok/s")
    overhead = 100 * (guided["ms_per_step"] / plain["ms_per_step"] - 1)
    print(f"  per-step overhead of the constraint: {overhead:+.1f}%")
    print(f"  new 5-field schema on an idle engine: compile {compile_ms:.2f} ms, "
          f"first token {first_ms:.2f} ms (unconstrained first token {plain_step_ms:.2f} ms)")


def first_token_latency_baseline(llm: LLM) -> float:
    start = time.perf_counter()
    llm.generate([[0, 11, 12]], SamplingParams(temperature=1.0, seed=0, max_tokens=1))
    return 1000 * (time.perf_counter() - start)


if __name__ == "__main__":
    main()
