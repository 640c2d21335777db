"""Host memory one request holds while it runs, per unit of the fields that drive it: the
measurement behind the constants of engine/server/admission.py (--max-request-memory).

The tiny Llama (tests/model_factory.py) is served with the core on a thread of this process
(`engine_core="thread"`), so tracemalloc sees both halves of a request's state: the serving
side (streams, detokenizers, the events turned into protobuf) and the core's (Request objects,
token lists, logprob entries). Each case runs the servicer's own path (generate_request_from_pb,
with_server_defaults, engine.loop.generate, event_to_pb) alone, after two warm-up passes over
every case (lazy imports are not per-request memory), and reports its traced peak above the
idle baseline. Per-unit costs are slopes between two cases that
differ in one field, so fixed per-request costs cancel. KV blocks and model tensors are torch
memory, allocated once at start-up: they are not per-request and tracemalloc does not see them.

    python benchmarks/request_memory.py            # about a minute on two cores
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import tracemalloc
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from model_factory import build_tiny_model  # noqa: E402

from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.frontend.served_model import Engine  # noqa: E402
from engine.generation import GenerationFinished  # noqa: E402
from engine.server.embed_convert import embed, embedding_request_from_pb  # noqa: E402
from engine.server.proto_convert import event_to_pb, generate_request_from_pb  # noqa: E402
from engine.server.request_defaults import with_server_defaults  # noqa: E402
from protoserve.v1 import common_pb2, inference_pb2  # noqa: E402

_runs = 0


async def generate_peak(engine: Engine, *, n: int = 1, prompt_tokens: int = 8,
                        max_tokens: int = 1, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> int:
    """Traced peak (bytes above the idle baseline) of one generate request: the largest of
    three runs, since how many undelivered events queue up between the step thread and the
    event loop varies from run to run, and that backlog is memory the request holds too."""
    global _runs
    sampling = common_pb2.SamplingParams(temperature=1.0, n=n, max_tokens=max_tokens,
                                         ignore_eos=True, seed=0)
    if logprobs is not None:
        sampling.logprobs = logprobs
    if prompt_logprobs is not None:
        sampling.prompt_logprobs = prompt_logprobs
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=[260 + i % 200 for i in range(prompt_tokens)]),
        sampling=sampling)
    peak = held = 0
    for _ in range(3):
        _runs += 1
        generation = with_server_defaults(generate_request_from_pb(request, f"m{_runs}"),
                                          request.sampling, engine)
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        finished = False
        async for event in engine.loop.generate(generation):
            event_to_pb(event, False)
            if isinstance(event, GenerationFinished) and not finished:
                finished = True  # what stays held until the end, without the transients
                held = max(held, tracemalloc.get_traced_memory()[0] - baseline)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - baseline)
    print(f"  n={n} prompt={prompt_tokens} max_tokens={max_tokens} logprobs={logprobs} "
          f"prompt_logprobs={prompt_logprobs}: held {held}, peak {peak}")
    return peak


async def embed_peak(engine: Engine, *, inputs: int, tokens: int) -> int:
    global _runs
    request = inference_pb2.EmbedRequest(inputs=[
        inference_pb2.EmbedInput(token_ids=common_pb2.TokenIds(ids=[260 + i % 200
                                                                    for i in range(tokens)]))
        for _ in range(inputs)])
    peak = 0
    for _ in range(2):
        _runs += 1
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await embed(engine, embedding_request_from_pb(request, f"e{_runs}"), None)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    return peak


def slope(low: int, high: int, units: int) -> float:
    return (high - low) / units


async def measure_generate(engine: Engine) -> dict[str, float]:
    for _ in range(2):  # every code path once first: lazy imports (torch ops) are not requests
        await generate_cases(engine)
    return await generate_cases(engine)


async def generate_cases(engine: Engine) -> dict[str, float]:
    base = await generate_peak(engine)
    choices = await generate_peak(engine, n=128)
    out_short = await generate_peak(engine, n=8, max_tokens=16)
    out_long = await generate_peak(engine, n=8, max_tokens=208)
    top_long = await generate_peak(engine, n=8, max_tokens=208, logprobs=20)
    prompt_long = await generate_peak(engine, prompt_tokens=408)
    prompt_lp = await generate_peak(engine, prompt_tokens=408, prompt_logprobs=20)
    return {
        "request (fixed)": float(base),
        "per choice": slope(base, choices, 127),
        "per output token (x n)": slope(out_short, out_long, 8 * 192),
        # logprobs=20: the sampled token plus 20 alternatives per output token.
        "per logprob entry (x n x max_tokens)": slope(out_long, top_long, 8 * 208 * 21),
        "per prompt token": slope(base, prompt_long, 400),
        "per prompt logprob entry (x prompt tokens)": slope(prompt_long, prompt_lp, 408 * 21),
    }


async def measure_embed(engine: Engine) -> dict[str, float]:
    await embed_cases(engine)
    return await embed_cases(engine)


async def embed_cases(engine: Engine) -> dict[str, float]:
    one = await embed_peak(engine, inputs=1, tokens=8)
    many = await embed_peak(engine, inputs=65, tokens=8)
    long = await embed_peak(engine, inputs=65, tokens=200)
    return {"embed input (fixed)": slope(one, many, 64),
            "embed token (x inputs)": slope(many, long, 65 * 192)}


async def started(engine: Engine, measure) -> dict[str, float]:
    engine.loop.start()  # binds to the running event loop
    return await measure(engine)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_model(Path(scratch) / "tiny")
        config = EngineConfig(model=ModelConfig(model=str(model_dir)), engine_core="thread")
        tracemalloc.start()
        results: dict[str, float] = {}
        for task, measure in (("generate", measure_generate), ("embed", measure_embed)):
            engine = Engine.load(replace(config, model=replace(config.model, task=task)))
            try:
                results |= asyncio.run(started(engine, measure))
            finally:
                engine.stop()
        tracemalloc.stop()
    for name, value in results.items():
        print(f"{name:45s} {value:10.0f} bytes")


if __name__ == "__main__":
    main()
