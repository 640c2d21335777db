"""Frontend tax: one workload offline, through our gRPC server and through the REST bridge.

The same requests (random token ids, fixed input and output lengths, EOS ignored so each
produces exactly --output-len tokens, greedy) run three ways, round-robin over --repeats rounds:
  offline  `engine.frontend.llm.LLM.generate` in this process, no server (the engine ceiling);
  grpc     protoserve.v1 Inference/Generate, --concurrency streams on one channel;
  bridge   the REST bridge's streaming /v1/completions, --concurrency HTTP clients;
  grpc-thread (opt-in) as grpc, against a second server whose step loop runs on a thread of
           the gRPC process (`--engine-core thread`) instead of its own process.
Both servers are one `engine-serve --role all` started with the engine flags the offline LLM
gets, so the lost throughput is what each hop costs. Targets: <= 5% (grpc) and <= 10% (bridge),
judged on the median of each round's loss. Serving CPU (engine + bridge processes against the
offline process, same tokens) is reported too: on a shared machine it is the steadier measure.
gRPC clients stream token ids (no text, as offline); the bridge streams text, so its figure
includes incremental detokenization and one SSE chunk per token. The served tokenizer spells
each of the model's ids as a word, so every token has text, as with a real tokenizer.

Run from the repository root:
    .venv/bin/python -m benchmarks.frontend_tax [--num-prompts 128] [--concurrency 64] \
        [--input-len 128] [--output-len 128] [--repeats 3] [--result-json r.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    # Allow `python benchmarks/frontend_tax.py` as well as `-m benchmarks...`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import DEFAULT_MODEL_DIR, count_parameters, ensure_bench_model
from benchmarks.cpu_meter import CpuMeter
from benchmarks.serving import random_requests, run_load, summarize
from benchmarks.serving_backends import (
    BENCH_MODEL_NAME,
    BenchRequest,
    GrpcClient,
    OpenAIClient,
    launch_server,
)

MODES = ("offline", "grpc", "bridge", "grpc-thread")
DEFAULT_MODES = ("offline", "grpc", "bridge")
TARGET_LOSS_PCT = {"grpc": 5.0, "bridge": 10.0, "grpc-thread": 5.0}
TOKENIZER_CACHE = Path("~/.cache/protoserve").expanduser()


def ensure_word_tokenizer(vocab_size: int) -> Path:
    """A tokenizer whose every id above the specials decodes to one word (" w123").

    The benchmark checkpoint has none, and the demo tokenizer's 2,000 ids leave most sampled
    ids without text; the bridge sends no chunk for a token without text, so it would do far
    less work than for a real model. Specials match the checkpoint: unk 0, BOS 1, EOS 2."""
    target = TOKENIZER_CACHE / f"bench-word-tokenizer-{vocab_size}"
    if (target / "tokenizer.json").is_file():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    # "\u0120" is byte-level BPE's spelling of a leading space.
    vocab.update({f"\u0120w{i}": i for i in range(len(vocab), vocab_size)})
    rust = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    rust.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", clean_up_tokenization_spaces=False)
    # Save beside and rename, so an interrupted build never looks complete.
    staging = target.with_name(target.name + ".partial")
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


@dataclass
class Run:
    """One timed pass of the workload through one mode."""

    output_tokens: int
    wall_s: float
    # CPU seconds per process over the pass: on a shared 2-core machine this shows where the
    # cycles went (the client, the engine process, the bridge process).
    cpu_s: dict[str, float]
    engine_steps: int | None = None  # offline only: the server exports no step counter
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def serving_cpu_s(self) -> float:
        """CPU spent producing the tokens: this process offline (it runs the engine), the
        engine, core and bridge processes when serving (a real client runs elsewhere)."""
        if self.engine_steps is not None:  # counted in process: offline
            return self.cpu_s["client"]
        return sum(self.cpu_s.get(name, 0.0) for name in ("engine", "core", "bridge"))


@dataclass
class Mode:
    name: str
    run: Callable[[list[BenchRequest]], Awaitable[Run]]
    runs: list[Run] = field(default_factory=list)

    def median_tokens_per_s(self) -> float:
        return statistics.median(r.output_tokens_per_s for r in self.runs)


# --- the modes -------------------------------------------------------------------------


def make_offline(model_dir: Path, args: argparse.Namespace, cpu: CpuMeter):
    from engine.frontend.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=args.kv_cache_memory,
              max_num_seqs=args.concurrency, max_num_batched_tokens=args.max_num_batched_tokens)

    async def run(requests: list[BenchRequest]) -> Run:
        # The serving clients send min_tokens = max_tokens too; it costs a masking pass per
        # step, so the offline engine must do it as well to run the same work.
        output_len = requests[0].output_len
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                                min_tokens=output_len)
        llm.core.kv_cache.pool.reset_prefix_cache()
        steps, before = llm.core.num_steps, cpu.sample()
        start = time.perf_counter()
        outputs = llm.generate([list(r.prompt) for r in requests], params)
        wall = time.perf_counter() - start
        lengths = {len(out.token_ids) for out in outputs}
        if lengths != {output_len}:
            raise RuntimeError(f"offline: expected {output_len} tokens per prompt, got {lengths}")
        return Run(sum(len(out.token_ids) for out in outputs), wall,
                   CpuMeter.delta(before, cpu.sample()), engine_steps=llm.core.num_steps - steps)

    return run


def make_online(name: str, send, concurrency: int, cpu: CpuMeter):
    async def run(requests: list[BenchRequest]) -> Run:
        before = cpu.sample()
        results, duration = await run_load(send, requests, math.inf, concurrency, seed=0)
        cpu_s = CpuMeter.delta(before, cpu.sample())
        failed = [r.error for r in results if not r.success]
        wrong = {r.output_tokens for r in results if r.success} - {requests[0].output_len}
        if failed or wrong:
            raise RuntimeError(f"{name}: {len(failed)} failed ({failed[:2]}), lengths {wrong}")
        summary = summarize(results, duration, {})
        return Run(int(summary["total_output_tokens"]), duration, cpu_s,  # type: ignore[arg-type]
                   ttft_ms=summary["ttft"]["median_ms"],  # type: ignore[index]
                   tpot_ms=summary["tpot"]["median_ms"])  # type: ignore[index]

    return run


# --- report ----------------------------------------------------------------------------------


def loss_pct(mode_tps: float, offline_tps: float) -> float:
    """Share of the offline output throughput a serving hop loses (negative: it gained)."""
    return 100.0 * (1.0 - mode_tps / offline_tps)


def report(modes: list[Mode]) -> dict[str, object]:
    offline = modes[0]
    rows: dict[str, object] = {}
    # Serving CPU per run hardly depends on what else the machine runs, so its overhead is a
    # steadier measure of each hop's cost than throughput on a shared machine.
    offline_cpu = statistics.median(r.serving_cpu_s for r in offline.runs)
    print(f"\n{'mode':<12}{'out tok/s':>11}{'runs':>24}{'loss':>8}{'per-round':>11}"
          f"{'ttft ms':>9}{'tpot ms':>9}{'serving CPU s':>15}  CPU s by process (median)")
    for mode in modes:
        tps = mode.median_tokens_per_s()
        # Loss from the medians, and the median of each round's loss: both ratios come from
        # runs interleaved in the same minutes.
        per_round = [loss_pct(r.output_tokens_per_s, o.output_tokens_per_s)
                     for r, o in zip(mode.runs, offline.runs, strict=True)]
        cpu = {name: statistics.median(r.cpu_s[name] for r in mode.runs)
               for name in mode.runs[0].cpu_s}
        row: dict[str, object] = {
            "output_tokens_per_s": round(tps, 1),
            "output_tokens_per_s_runs": [round(r.output_tokens_per_s, 1) for r in mode.runs],
            "wall_s_runs": [round(r.wall_s, 3) for r in mode.runs],
            "cpu_s_median": cpu,
            "serving_cpu_s_median": statistics.median(r.serving_cpu_s for r in mode.runs),
        }
        serving_cpu = f"{row['serving_cpu_s_median']:.1f}"
        loss = ttft = tpot = ""
        if mode is not offline:
            row["loss_pct"] = round(loss_pct(tps, offline.median_tokens_per_s()), 1)
            row["loss_pct_per_round"] = [round(x, 1) for x in per_round]
            row["loss_pct_per_round_median"] = round(statistics.median(per_round), 1)
            row["target_loss_pct"] = TARGET_LOSS_PCT[mode.name]
            row["ttft_ms_median"] = round(statistics.median(r.ttft_ms or 0 for r in mode.runs), 1)
            row["tpot_ms_median"] = round(statistics.median(r.tpot_ms or 0 for r in mode.runs), 2)
            loss = f"{row['loss_pct']:.1f}%"
            ttft, tpot = f"{row['ttft_ms_median']:.0f}", f"{row['tpot_ms_median']:.1f}"
            per_round_text = f"{row['loss_pct_per_round_median']:.1f}%"
            row["serving_cpu_overhead_pct"] = round(
                100 * (row["serving_cpu_s_median"] / offline_cpu - 1), 1)  # type: ignore[operator]
            serving_cpu += f" ({row['serving_cpu_overhead_pct']:+.0f}%)"
        else:
            steps = statistics.median(r.engine_steps or 0 for r in mode.runs)
            wall = statistics.median(r.wall_s for r in mode.runs)
            row["engine_steps_per_s"] = round(steps / wall, 1)
            row["output_tokens_per_step"] = round(mode.runs[0].output_tokens / steps, 1)
            per_round_text = ""
        runs = " ".join(f"{r.output_tokens_per_s:.0f}" for r in mode.runs)
        cpu_text = " ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        print(f"{mode.name:<12}{tps:>11.1f}{runs:>24}{loss:>8}{per_round_text:>11}"
              f"{ttft:>9}{tpot:>9}{serving_cpu:>15}  {cpu_text}")
        rows[mode.name] = row
    first = rows["offline"]
    print(f"offline engine: {first['engine_steps_per_s']} steps/s, "  # type: ignore[index]
          f"{first['output_tokens_per_step']} output tokens per step")  # type: ignore[index]
    for name, target in TARGET_LOSS_PCT.items():
        if name in rows:
            # Judged on the per-round losses: each pairs runs minutes apart, so load that
            # drifts over the whole benchmark cancels out of it.
            lost = rows[name]["loss_pct_per_round_median"]  # type: ignore[index]
            verdict = "meets" if lost <= target else "MISSES"
            print(f"{name}: {lost:.1f}% lost vs offline (median per round), {verdict} the "
                  f"<= {target:.0f}% target")
    return rows


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from protoserve.arg_types import parse_bytes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                   help="checkpoint (the benchmark model is built there if missing)")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64,
                   help="streams in flight; also the engine's --max-num-seqs in every mode")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; medians reported")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default="1GiB")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                   help="offline always runs: it is the reference")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the offline engine and the server (OMP_NUM_THREADS); "
                        "default: torch's, every core")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None)
    return p.parse_args(argv)


def server_flags(args: argparse.Namespace) -> list[str]:
    """Engine flags that differ from engine-serve's defaults, as the offline LLM gets them."""
    return ["--kv-cache-memory", str(args.kv_cache_memory),
            "--max-num-seqs", str(args.concurrency),
            "--max-num-batched-tokens", str(args.max_num_batched_tokens)]


async def benchmark(args: argparse.Namespace, model_dir: Path) -> list[Mode]:
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    online = [m for m in MODES[1:] if m in args.modes]
    server = thread_server = None
    tokenizer = ensure_word_tokenizer(vocab_size)
    if "grpc" in online or "bridge" in online:
        print(f"launching engine-serve --role all {' '.join(server_flags(args))} ...", flush=True)
        # After launch_server's own --tokenizer, so this one wins.
        server = launch_server(model_dir, "all", *server_flags(args),
                               "--tokenizer", str(tokenizer))
    if "grpc-thread" in online:
        print("launching engine-serve --role engine --engine-core thread ...", flush=True)
        thread_server = launch_server(model_dir, "engine", *server_flags(args),
                                      "--tokenizer", str(tokenizer), "--engine-core", "thread")
    clients: list[GrpcClient | OpenAIClient] = []
    try:
        cpu = CpuMeter(server.process.pid if server else None)
        modes = [Mode("offline", make_offline(model_dir, args, cpu))]
        if server is not None and "grpc" in online:
            clients.append(GrpcClient(server.grpc_address, BENCH_MODEL_NAME))
            modes.append(Mode("grpc", make_online("grpc", clients[-1], args.concurrency, cpu)))
        if server is not None and "bridge" in online:
            clients.append(OpenAIClient(f"{server.http_url}/v1", BENCH_MODEL_NAME))
            modes.append(Mode("bridge", make_online("bridge", clients[-1], args.concurrency, cpu)))
        if thread_server is not None:
            clients.append(GrpcClient(thread_server.grpc_address, BENCH_MODEL_NAME))
            thread_cpu = CpuMeter(thread_server.process.pid)
            modes.append(Mode("grpc-thread", make_online("grpc-thread", clients[-1],
                                                         args.concurrency, thread_cpu)))

        def workload(num: int, output_len: int, seed: int) -> list[BenchRequest]:
            return random_requests(num, args.input_len, output_len, vocab_size, seed)

        # Warm-up at full concurrency (short outputs) builds every batch shape's kernels and
        # opens the connections; fresh prompts every pass keep the prefix cache out of it.
        for index, mode in enumerate(modes):
            print(f"{mode.name}: warm-up", flush=True)
            await mode.run(workload(args.concurrency, min(8, args.output_len),
                                    args.seed + 10_000 + index))
        for round_index in range(args.repeats):
            print(f"round {round_index + 1}/{args.repeats}", flush=True)
            # Each round starts with the next mode, so no mode always runs first or last.
            shift = round_index % len(modes)
            for index, mode in enumerate(modes[shift:] + modes[:shift]):
                seed = args.seed + 100 * round_index + index
                run = await mode.run(workload(args.num_prompts, args.output_len, seed))
                mode.runs.append(run)
                print(f"  {mode.name}: {run.output_tokens_per_s:.1f} output tok/s "
                      f"({run.wall_s:.2f} s, CPU {run.cpu_s})", flush=True)
        return modes
    finally:
        for client in clients:
            await client.close()
        for launched in (server, thread_server):
            if launched is not None:
                launched.stop()


def main() -> None:
    args = parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        # The server reads it at start-up (launch_server passes this environment on).
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    model_dir = ensure_bench_model(args.model_dir)
    print(f"model {model_dir} ({count_parameters(model_dir) / 1e6:.1f}M params, bf16); "
          f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
          f"{args.concurrency} concurrent; repeats {args.repeats}", flush=True)
    from benchmarks.machine import machine_info

    machine = machine_info()
    modes = asyncio.run(benchmark(args, model_dir))
    machine["loadavg_end"] = os.getloadavg()
    rows = report(modes)
    if args.result_json:
        result = {
            "machine": machine,
            "model": {"dir": str(model_dir), "parameters": count_parameters(model_dir),
                      "dtype": "bfloat16"},
            "workload": {key: getattr(args, key) for key in (
                "num_prompts", "concurrency", "input_len", "output_len", "repeats",
                "kv_cache_memory", "max_num_batched_tokens", "threads", "seed")},
            "engine_flags": ["--dtype", "bfloat16", *server_flags(args)],
            "modes": rows,
        }
        Path(args.result_json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
