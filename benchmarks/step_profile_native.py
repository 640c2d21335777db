"""Where a CPU step goes, by the native step timers: benchmarks.step_profile --native-timers.

A fused decode step is one native call (engine/models/fused_decode.py), opaque to
torch.profiler. With the native step timers on (engine/step_timers.py) each step splits into
the kernels' regions (qkv, attention, o, gate_up, activation, down, norms, rotary, router,
experts, lora, residual; `linear` = the LM head in a decode step, every projection in a
prefill step), the Python phases of the engine step timed here (schedule, prepare inputs,
the rest of the forward, sampling, the scheduler's output update) and the remainder
(idle / wait / untimed glue). Detokenization runs outside the engine step (frontend) and is
not in these steps. Also the linear kernel's GFLOP/s per layer type at 16/64/256 rows against
oneDNN (F.linear on bf16) and the machine's measured bf16 peak (a large oneDNN GEMM).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from benchmarks.attention_kernels import median_seconds
from engine import ops, step_timers
from engine.core.core_request import CoreRequest
from engine.frontend.llm import LLM
from engine.runner import model_runner
from engine.sampling_params import SamplingParams

PHASES = ("schedule", "prepare_inputs", "forward", "lm_head", "sample", "update")


class PhaseClock:
    """Seconds per Python phase of the engine step, by wrapping the callables it runs."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        real = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        own = attr in getattr(owner, "__dict__", {})
        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, real) if own else delattr(owner, attr))

    def reset(self) -> None:
        self.seconds.clear()

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def profile_steps(llm: LLM, batch_size: int, prompt_len: int, steps: int,
                  warmup: int = 5) -> dict[str, Any]:
    """Steady decode at `batch_size` (and the prefill steps before it), per step in ms."""
    runner = llm.runner
    clock = PhaseClock()
    clock.wrap(llm.core.scheduler, "schedule", "schedule")
    clock.wrap(llm.core.scheduler, "update_from_output", "update")
    clock.wrap(model_runner, "prepare_inputs", "prepare_inputs")
    clock.wrap(runner.loaded.model, "forward", "forward")
    clock.wrap(runner, "compute_logits", "lm_head")
    clock.wrap(runner.sampler, "sample_with_logprobs", "sample")
    vocab = runner.loaded.vocab_size
    generator = torch.Generator().manual_seed(batch_size)
    prompts = torch.randint(3, vocab, (batch_size, prompt_len), generator=generator).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 5, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        llm.core.add_request(CoreRequest(f"native-{batch_size}-{index}", tuple(prompt), params,
                                         max_tokens=params.max_tokens,
                                         eos_token_ids=llm.processor.limits.eos_token_ids))
    step_timers.enable(True)
    try:
        prompt_tokens = batch_size * prompt_len + llm.core.num_computed_tokens_total
        prefill = _measure(
            llm, clock, lambda: llm.core.num_computed_tokens_total < prompt_tokens, None)
        for _ in range(warmup):
            llm.core.step()
        decode = _measure(llm, clock, lambda: True, steps)
        while llm.core.has_unfinished_requests:
            llm.core.step()
    finally:
        step_timers.enable(False)
        clock.restore()
    return {"batch_size": batch_size, "prompt_len": prompt_len, "prefill": prefill,
            "decode": decode}


def _measure(llm: LLM, clock: PhaseClock, more: Callable[[], bool],
             steps: int | None) -> dict[str, Any]:
    step_timers.reset()
    clock.reset()
    count, start = 0, time.perf_counter()
    while (steps is None and more()) or (steps is not None and count < steps):
        llm.core.step()
        count += 1
    wall = time.perf_counter() - start
    native = {name: ns / 1e6 / max(count, 1) for name, (ns, calls) in step_timers.read().items()
              if calls}
    phases = {name: clock.seconds[name] * 1e3 / max(count, 1) for name in PHASES}
    native_total = sum(native.values())
    # Python inside the forward / LM head = their wall time less the kernels they ran. In a
    # fused decode step `linear` is the LM head alone; in a per-op step the LM head's share of
    # `linear` is not separable, so its whole wall counts as kernel time (an estimate).
    linear = native.get("linear", 0.0)
    lm_head_ms = phases["lm_head"]
    native_in_lm_head = linear if "qkv" in native else min(lm_head_ms, linear)
    host = dict(phases)
    host["forward"] = phases["forward"] - (native_total - native_in_lm_head)
    host["lm_head"] = phases["lm_head"] - native_in_lm_head
    wall_ms = wall * 1e3 / max(count, 1)
    return {"steps": count, "wall_ms": wall_ms, "native_ms": native,
            "native_total_ms": native_total, "host_ms": host,
            "idle_wait_ms": wall_ms - native_total - sum(host.values())}


def linear_rates(shapes: dict[str, tuple[int, int]], rows: tuple[int, ...],
                 repeats: int) -> dict[str, Any]:
    """GFLOP/s per layer type: ours (ops.linear_bf16) and oneDNN (F.linear on bf16). One
    weight per shape, so it can stay in cache: the compute rate at these rows, not the
    weight-streaming rate of a whole step (benchmarks.linear_kernels measures that)."""
    big = torch.randn(2048, 2048, dtype=torch.bfloat16)
    peak_s = median_seconds(lambda: big @ big, repeats)
    results: dict[str, Any] = {"bf16_peak_gflops": 2 * 2048**3 / peak_s / 1e9, "layers": {}}
    for name, (in_features, out_features) in shapes.items():
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
        packed = ops.pack_linear_weight(weight) if ops.linear_bf16_available() else None
        for count in rows:
            x = torch.randn(count, in_features, dtype=torch.bfloat16)
            flops = 2 * count * in_features * out_features
            entry = {"onednn_gflops": flops / median_seconds(lambda: F.linear(x, weight),
                                                             repeats) / 1e9}
            if packed is not None:
                entry["ours_gflops"] = flops / median_seconds(
                    lambda: ops.linear_bf16(x, packed, None, out_features), repeats) / 1e9
            results["layers"][f"{name}@{count}"] = entry
    return results


def bench_shapes(llm: LLM) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per layer type of the served model."""
    config = llm.runner.loaded.hf_config
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"qkv": (hidden, (heads + 2 * kv_heads) * head_dim), "o": (heads * head_dim, hidden),
            "gate_up": (hidden, 2 * inter), "down": (inter, hidden),
            "lm_head": (hidden, config.vocab_size)}


def run(llm: LLM, batch_sizes: list[int], prompt_len: int, steps: int, out: Path) -> None:
    profiles = [profile_steps(llm, size, prompt_len, steps) for size in batch_sizes]
    report = {"model": str(llm.runner.loaded.hf_config.name_or_path),
              "threads": torch.get_num_threads(), "profiles": profiles,
              "linear": linear_rates(bench_shapes(llm), (16, 64, 256), repeats=5),
              "note": "busy shared machine: shares only; rerun quiet for the numbers"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for profile in profiles:
        for kind in ("prefill", "decode"):
            row = profile[kind]
            print(f"batch {profile['batch_size']} {kind}: {row['wall_ms']:.2f} ms/step wall, "
                  f"native {row['native_total_ms']:.2f}, idle/wait {row['idle_wait_ms']:.2f}")
            print("  native", {k: round(v, 3) for k, v in row["native_ms"].items()})
            print("  host  ", {k: round(v, 3) for k, v in row["host_ms"].items()})
    rates = report["linear"]
    print(f"linear GFLOP/s (bf16 peak {rates['bf16_peak_gflops']:.0f}):",
          {k: {n: round(v) for n, v in e.items()} for k, e in rates["layers"].items()})
    print(f"wrote {out}")
