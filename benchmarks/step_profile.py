"""Where a decode step's time goes on a device: torch.profiler over steady decode steps.

Run from the repository root (a GPU example: Llama-3-8B shape, random weights):
    .venv/bin/python -m benchmarks.step_profile --device cuda --shape llama3-8b --batch-size 1
    .venv/bin/python -m benchmarks.step_profile --batch-size 64          # CPU, bench model
    .venv/bin/python -m benchmarks.step_profile --family gemma2 --batch-size 16  # family shape
    .venv/bin/python -m benchmarks.step_profile --native-timers     # CPU: inside the fused step

--native-timers (CPU) splits each step by the native step timers instead (decode at 16 and
64 streams by default, and the prefill chunks before it; benchmarks/step_profile_native.py)
and writes JSON under benchmarks/results/.

Every request decodes at once (ignore_eos), so after the prefill each engine step is one
decode token per request. Prints the wall time per step, the device's busy time per step
(CUDA kernel time; on CPU the sum of op self times), and the ops that cost most host time:
on a GPU the gap between the two is what launch overhead and Python cost.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import step_profile_native
from benchmarks.bench_model import (
    CONFIG_ONLY_SHAPES,
    SHAPE_NAMES,
    ensure_bench_model,
    ensure_shape_dir,
)
from benchmarks.family_models import FAMILY_SHAPES, ensure_family_model
from engine.core.core_request import CoreRequest
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=SHAPE_NAMES, default="bench-100m")
    parser.add_argument("--family", choices=sorted(FAMILY_SHAPES), default=None,
                        help="a benchmarks/family_models.py shape instead of --shape")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps")
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    parser.add_argument("--native-timers", action="store_true",
                        help="CPU: split steps by the native step timers (not torch.profiler)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64],
                        help="with --native-timers: the decode batch sizes profiled")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/cpu-2026-12-08/step_profile_native.json"))
    args = parser.parse_args()
    if args.family is not None:
        model_dir, load_format = ensure_family_model(args.family), "auto"
    elif args.shape in CONFIG_ONLY_SHAPES:
        model_dir, load_format = ensure_shape_dir(args.shape), "dummy"
    else:
        model_dir, load_format = ensure_bench_model(), "auto"
    llm = LLM(str(model_dir), dtype="bfloat16", device=args.device, load_format=load_format,
              max_num_seqs=max(256, args.batch_size, *args.batch_sizes))
    if args.native_timers:
        step_profile_native.run(llm, args.batch_sizes, args.prompt_len, args.steps, args.out)
        return
    vocab = llm.runner.loaded.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=generator)
    warmup, measured = 10, args.steps
    params = SamplingParams(temperature=0.0, max_tokens=warmup + measured + 5, ignore_eos=True)
    cuda = llm.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # The prefill and warm-up steps run outside the profile.
    llm_steps = _stepper(llm, prompts.tolist(), params)
    for _ in range(warmup):
        next(llm_steps)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(measured):
            next(llm_steps)
        sync()
        wall = (time.perf_counter() - start) / measured
    events = prof.key_averages()
    if cuda:
        # Kernel events only: an aten op's row repeats the time of the kernels it launched.
        kernels = [e for e in events if e.device_type == DeviceType.CUDA
                   and not e.is_user_annotation]
        busy = sum(e.self_device_time_total for e in kernels) / 1e3 / measured
        label = "CUDA kernel time"
    else:
        busy = sum(e.self_cpu_time_total for e in events) / 1e3 / measured
        label = "op self time"
    print(f"{model_dir.name} on {args.device}, batch {args.batch_size}: "
          f"{wall * 1e3:.2f} ms per step wall, {busy:.2f} ms per step {label}")
    sort_by = "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=args.rows))


def _stepper(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> Iterator[None]:
    """Engine steps, one per next(); the requests go in first and their prefill runs in the
    first steps (which count as warm-up)."""
    for index, prompt in enumerate(prompts):
        llm.core.add_request(CoreRequest(f"profile-{index}", tuple(prompt), params,
                                         max_tokens=params.max_tokens,
                                         eos_token_ids=llm.processor.limits.eos_token_ids))
    while llm.core.has_unfinished_requests:
        llm.core.step()
        yield
    raise RuntimeError("the requests finished before the profile did")


if __name__ == "__main__":
    main()
