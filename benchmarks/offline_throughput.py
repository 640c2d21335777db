"""Offline throughput: protoserve `LLM.generate` vs transformers `generate` and `generate_batch`.

All three run in one process on the same bf16 checkpoint (benchmarks/bench_model.py), the
same random prompts and exactly `--output-len` greedy tokens per prompt (EOS ignored), so the
only difference is the engine. This is the engine ceiling in the sense of
`vllm bench throughput`: every prompt is submitted at t = 0 and no server is involved.

Run from the repository root:
    .venv/bin/python -m benchmarks.offline_throughput [--num-prompts 32] [--input-len 128] \
        [--output-len 128] [--repeats 3] [--json results.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Allow `python benchmarks/offline_throughput.py` as well as `-m benchmarks...`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: F401  (torch warns when imported without numpy loaded first)
import torch

from benchmarks.bench_model import DEFAULT_MODEL_DIR, count_parameters, ensure_bench_model

Prompts = list[list[int]]
Outputs = list[list[int]]


@dataclass
class RunResult:
    name: str
    wall_s: list[float] = field(default_factory=list)
    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    skipped: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    def summary(self) -> dict[str, object]:
        if self.skipped is not None:
            return {"name": self.name, "skipped": self.skipped}
        median = self.median_s
        return {
            "name": self.name,
            "wall_s_runs": [round(t, 3) for t in self.wall_s],
            "wall_s_median": round(median, 3),
            "output_tokens_per_s": round(self.num_output_tokens / median, 1),
            "total_tokens_per_s": round((self.num_output_tokens + self.num_prompt_tokens) / median, 1),
            "requests_per_s": round(self.num_requests / median, 3),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
        }


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> Prompts:
    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids so prompts never contain the BOS/EOS/pad ids of the config.
    ids = torch.randint(3, vocab_size, (num_prompts, input_len), generator=generator)
    return ids.tolist()


def time_runs(
    name: str, run: Callable[[Prompts], Outputs], prompts: Prompts, output_len: int, repeats: int
) -> tuple[RunResult, Outputs]:
    """Time `run(prompts)` `repeats` times; check that every prompt got exactly output_len tokens."""
    result = RunResult(name, num_requests=len(prompts))
    outputs: Outputs = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = run(prompts)
        result.wall_s.append(time.perf_counter() - start)
        print(f"  {name}: {result.wall_s[-1]:.2f} s", flush=True)
    lengths = {len(tokens) for tokens in outputs}
    if lengths != {output_len}:
        raise RuntimeError(f"{name}: expected {output_len} tokens per prompt, got lengths {lengths}")
    result.num_prompt_tokens = sum(len(p) for p in prompts)
    result.num_output_tokens = sum(len(o) for o in outputs)
    return result, outputs


# --- the three contenders ------------------------------------------------------------------


def make_ours(model_dir: Path, output_len: int, num_prompts: int) -> Callable[[Prompts], Outputs]:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    # Default scheduler settings; max_num_seqs only grows when the workload needs more.
    llm = LLM(str(model_dir), dtype="bfloat16", max_num_seqs=max(256, num_prompts))
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def run(prompts: Prompts) -> Outputs:
        # Repeats reuse the same prompts: drop the prefix cache so no run is served from the
        # previous one (microseconds; there is nothing to recompute).
        llm.core.kv_cache.pool.reset_prefix_cache()
        outputs = llm.generate(prompts, params)
        hits = sum(out.num_cached_tokens for out in outputs)
        if hits:
            raise RuntimeError(f"ours: {hits} prompt tokens came from the prefix cache")
        return [out.token_ids for out in outputs]

    return run


def load_hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()


def make_hf_generate(
    model: torch.nn.Module, output_len: int, batch_size: int
) -> Callable[[Prompts], Outputs]:
    pad_id = 0

    def run(prompts: Prompts) -> Outputs:
        outputs: Outputs = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding keeps every row's last prompt token in the last column.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.inference_mode():
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=output_len,
                    min_new_tokens=output_len,
                    pad_token_id=pad_id,
                )
            outputs.extend(generated[:, width:].tolist())
        return outputs

    return run


def make_hf_generate_batch(
    model: torch.nn.Module, output_len: int, input_len: int, num_prompts: int, max_batch_tokens: int
) -> Callable[[Prompts], Outputs] | str:
    """The runner, or the reason continuous batching is not usable here."""
    if not hasattr(model, "generate_batch"):
        return "this transformers has no model.generate_batch"
    try:
        from transformers import GenerationConfig
        from transformers.generation import ContinuousBatchingConfig
    except ImportError as error:
        return f"continuous batching API not importable: {error}"

    # eos_token_id=-1 disables EOS (its min_new_tokens processor is not supported in CB).
    generation_config = GenerationConfig(
        max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    page_size = 256
    pages_per_request = -(-(input_len + output_len) // page_size)
    # Sized for the workload, like ours: on CPU the default would claim 90% of host RAM.
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=num_prompts * pages_per_request + 4,
        max_batch_tokens=max_batch_tokens,
    )

    def run(prompts: Prompts) -> Outputs:
        with torch.inference_mode():
            results = model.generate_batch(
                inputs=prompts,
                generation_config=generation_config,
                continuous_batching_config=cb_config,
            )
        failed = [key for key, out in results.items() if out.error is not None]
        if len(results) != len(prompts) or failed:
            raise RuntimeError(f"generate_batch: {len(results)} results, failed {failed}")
        return [list(out.generated_tokens) for out in results.values()]

    return run


# --- report ---------------------------------------------------------------------------------


def machine_info() -> dict[str, object]:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def greedy_agreement(ours: Outputs, reference: Outputs, first_n: int) -> dict[str, object]:
    """How long our greedy tokens match the reference, per prompt (bf16 may diverge later)."""
    prefix_lengths = []
    for a, b in zip(ours, reference, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix_lengths.append(n)
    return {
        "num_prompts": len(prefix_lengths),
        "first_n": first_n,
        "prompts_matching_first_n": sum(n >= first_n for n in prefix_lengths),
        "matching_prefix_lengths": prefix_lengths,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Offline throughput of protoserve LLM.generate vs transformers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="benchmark checkpoint directory (built there if missing)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="static batch size for transformers generate (default: num-prompts)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender; median reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--check-tokens", type=int, default=8,
                        help="leading tokens that must agree in the greedy check")
    parser.add_argument("--skip", nargs="*", default=[], choices=["hf-generate", "hf-generate-batch"],
                        help="contenders to leave out")
    parser.add_argument("--json", default=None, help="write the results to this path")
    return parser.parse_args()


def print_table(results: list[RunResult]) -> None:
    print(f"\n{'contender':<28}{'wall s (median)':>16}{'output tok/s':>14}{'total tok/s':>13}")
    for result in results:
        row = result.summary()
        if result.skipped is not None:
            print(f"{result.name:<28}  skipped: {result.skipped}")
            continue
        print(
            f"{result.name:<28}{row['wall_s_median']:>16.2f}"
            f"{row['output_tokens_per_s']:>14.1f}{row['total_tokens_per_s']:>13.1f}"
        )


def main() -> None:
    args = parse_args()
    # One thread count for every contender, set once: all cores this process may use.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model_dir = ensure_bench_model(args.model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size, args.seed)
    # Different prompts for warm-up, so the timed runs cannot hit anything it cached.
    warmup_prompts = make_prompts(2, args.input_len, vocab_size, args.seed + 1)
    machine = machine_info()
    print(
        f"model {model_dir} ({count_parameters(model_dir) / 1e6:.1f}M params, bf16); "
        f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out; "
        f"repeats {args.repeats}\n{machine}",
        flush=True,
    )

    results: list[RunResult] = []
    outputs: dict[str, Outputs] = {}

    def bench(name: str, run: Callable[[Prompts], Outputs]) -> None:
        print(f"{name}: warm-up", flush=True)
        run(warmup_prompts)
        result, outputs[name] = time_runs(name, run, prompts, args.output_len, args.repeats)
        results.append(result)

    ours = make_ours(model_dir, args.output_len, args.num_prompts)
    bench("protoserve LLM.generate", ours)
    del ours  # frees our KV cache before transformers runs

    model = load_hf_model(model_dir)
    hf_batch_size = args.hf_batch_size or args.num_prompts
    if "hf-generate" in args.skip:
        results.append(RunResult("hf generate", skipped="--skip"))
    else:
        bench(f"hf generate (bs {hf_batch_size})", make_hf_generate(model, args.output_len, hf_batch_size))
    cb_name = "hf generate_batch"
    if "hf-generate-batch" in args.skip:
        results.append(RunResult(cb_name, skipped="--skip"))
    else:
        cb_run = make_hf_generate_batch(
            model, args.output_len, args.input_len, args.num_prompts, max_batch_tokens=2048
        )
        if isinstance(cb_run, str):
            print(f"{cb_name}: skipped ({cb_run})")
            results.append(RunResult(cb_name, skipped=cb_run))
        else:
            try:
                bench(cb_name, cb_run)
            except Exception as error:  # a peer failing on CPU must not lose the other numbers
                print(f"{cb_name}: skipped ({type(error).__name__}: {error})")
                results.append(RunResult(cb_name, skipped=f"{type(error).__name__}: {error}"))

    print_table(results)
    ours_result = results[0]
    ratios: dict[str, float] = {}
    for other in results[1:]:
        if other.skipped is None:
            ratios[f"ours / {other.name}"] = round(other.median_s / ours_result.median_s, 2)
    for label, ratio in ratios.items():
        print(f"throughput ratio {label}: {ratio:.2f}x")

    agreement: dict[str, object] = {}
    names = list(outputs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            check = greedy_agreement(outputs[first], outputs[second], args.check_tokens)
            agreement[f"{first} vs {second}"] = check
            prefixes = check["matching_prefix_lengths"]
            print(
                f"greedy agreement {first} vs {second}: "
                f"{check['prompts_matching_first_n']}/{check['num_prompts']} prompts match the "
                f"first {args.check_tokens} tokens; matching prefix median "
                f"{statistics.median(prefixes)} of {args.output_len} (min {min(prefixes)})"
            )

    if args.json:
        report = {
            "machine": machine,
            "model": {"dir": str(model_dir), "parameters": count_parameters(model_dir), "dtype": "bfloat16"},
            "workload": {
                "num_prompts": args.num_prompts,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "hf_batch_size": hf_batch_size,
                "repeats": args.repeats,
                "seed": args.seed,
            },
            "results": [r.summary() for r in results],
            "ratios_output_throughput": ratios,
            "greedy_agreement": agreement,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
