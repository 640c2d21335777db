"""Online serving benchmark: Poisson load against our gRPC endpoint or any OpenAI-compatible one.

Measures what `vllm bench serve` measures, the same way (client-side timestamps per streamed
chunk): TTFT, TPOT = (E2E - TTFT) / (output tokens - 1) per request, ITL (every chunk gap,
pooled), E2E latency (mean, median, p99), request and token throughput, and goodput (requests/s
meeting every `--slo`).

Run from the repository root, e.g. against our own server started on the benchmark model:
    .venv/bin/python -m benchmarks.serving --launch --backend grpc --num-prompts 32 \
        --random-input-len 64 --random-output-len 32 --request-rate 2 inf --result-json r.json
or against any server:
    .venv/bin/python -m benchmarks.serving --backend openai --base-url http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_model import SHAPE_NAMES
from benchmarks.serving_backends import (
    BENCH_MODEL_NAME,
    BenchRequest,
    GrpcClient,
    OpenAIClient,
    RequestFunc,
    RequestResult,
    fetch_model_name,
    launch_server,
)

METRICS = ("ttft", "tpot", "itl", "e2el")


# --- datasets --------------------------------------------------------------------------------


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int,
                    seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    # Ids from 3 up skip the usual BOS/EOS/pad ids; a fresh seed per run keeps the prefix cache
    # from serving one run's prompts to the next.
    return [BenchRequest([rng.randrange(3, vocab_size) for _ in range(input_len)], input_len,
                         output_len) for _ in range(num)]


def sharegpt_requests(path: Path, num: int, tokenizer_dir: str, seed: int,
                      fixed_output_len: int | None) -> list[BenchRequest]:
    """ShareGPT-format JSON (a list of {"conversations": [{"from", "value"}, ...]}): the first
    turn is the prompt, the second's token count the output length. Filters as vLLM does:
    prompt >= 4 and output >= 4 tokens, prompt <= 1024 and prompt + output <= 2048."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    entries = [e for e in json.loads(path.read_text())
               if len(e.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(entries)
    requests: list[BenchRequest] = []
    for entry in entries:
        prompt, completion = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
        prompt_len = len(tokenizer(prompt).input_ids)
        output_len = fixed_output_len or len(tokenizer(completion).input_ids)
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        requests.append(BenchRequest(prompt, prompt_len, output_len))
        if len(requests) == num:
            break
    if not requests:
        raise SystemExit(f"no usable conversations in {path}")
    return requests


# --- load generation -------------------------------------------------------------------------


async def run_load(send: RequestFunc, requests: list[BenchRequest], rate: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Send `requests` with exponential gaps of mean 1/rate (all at t = 0 for inf), at most
    `max_concurrency` in flight; return the results and the wall time."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(request: BenchRequest) -> RequestResult:
        if limit is None:
            return await send(request)
        async with limit:
            return await send(request)

    tasks = []
    start = time.perf_counter()
    for i, request in enumerate(requests):
        tasks.append(asyncio.create_task(one(request)))
        if math.isfinite(rate) and i + 1 < len(requests):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(values)
    # Linear interpolation, as numpy.percentile (what vLLM's script uses) does.
    pos = 0.99 * (len(ordered) - 1)
    low = int(pos)
    p99 = ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (pos - low)
    return {"mean_ms": 1e3 * statistics.fmean(ordered),
            "median_ms": 1e3 * statistics.median(ordered), "p99_ms": 1e3 * p99}


def summarize(results: list[RequestResult], duration_s: float,
              slo_ms: dict[str, float]) -> dict[str, object]:
    ok = [r for r in results if r.success]
    ttft = [r.ttft_s for r in ok]
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [gap for r in ok for gap in r.itl_s]
    e2el = [r.e2e_s for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)

    def meets(r: RequestResult) -> bool:
        per_token = (r.e2e_s - r.ttft_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft_s, "tpot": per_token, "e2el": r.e2e_s}
        return all(1e3 * measured[name] <= bound for name, bound in slo_ms.items())

    summary: dict[str, object] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration_s,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
    }
    if slo_ms:
        summary["goodput"] = sum(meets(r) for r in ok) / duration_s
    for name, values in zip(METRICS, (ttft, tpot, itl, e2el), strict=True):
        summary[name] = _stats(values)
    return summary


def print_summary(rate: float, summary: dict[str, object]) -> None:
    print(f"\n=========== request rate {rate} req/s ===========")
    print(f"completed {summary['completed']}  failed {summary['failed']}  "
          f"duration {summary['duration_s']:.2f} s")
    for error in summary["errors"]:  # type: ignore[union-attr]
        print(f"  error: {error}")
    print(f"request throughput      {summary['request_throughput']:10.2f} req/s")
    print(f"output token throughput {summary['output_throughput']:10.1f} tok/s")
    print(f"total token throughput  {summary['total_token_throughput']:10.1f} tok/s")
    if "goodput" in summary:
        print(f"goodput                 {summary['goodput']:10.2f} req/s")
    print(f"{'ms':<6}{'mean':>10}{'median':>10}{'p99':>10}")
    for name in METRICS:
        s = summary[name]
        print(f"{name:<6}{s['mean_ms']:>10.2f}{s['median_ms']:>10.2f}{s['p99_ms']:>10.2f}")  # type: ignore[index]


def plot(runs: list[dict[str, object]], path: Path) -> None:
    """Median and p99 of each latency against the achieved request rate (inf has no number of
    its own, so the x axis is what was measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.5))
    xs = [run["summary"]["request_throughput"] for run in runs]  # type: ignore[index]
    for ax, name in zip(axes, METRICS, strict=True):
        for key, style in (("median_ms", "o-"), ("p99_ms", "s--")):
            ax.plot(xs, [run["summary"][name][key] for run in runs], style,  # type: ignore[index]
                    label=key.removesuffix("_ms"))
        for x, run in zip(xs, runs, strict=True):
            ax.annotate(f"{run['request_rate']}", (x, run["summary"][name]["median_ms"]),  # type: ignore[index]
                        fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_title(name.upper())
        ax.set_xlabel("achieved req/s (label: requested rate)")
        ax.set_ylabel("ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


# --- CLI -------------------------------------------------------------------------------------


def parse_slo(text: str | None) -> dict[str, float]:
    slo: dict[str, float] = {}
    for part in (text or "").replace(" ", ",").split(","):
        if part:
            name, _, value = part.partition(":")
            if name not in ("ttft", "tpot", "e2el"):
                raise argparse.ArgumentTypeError(f"unknown SLO metric {name!r}")
            slo[name] = float(value)
    return slo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", choices=["grpc", "openai"], default="grpc")
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC address (backend grpc)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="backend openai")
    p.add_argument("--model", default=None,
                   help="model name to send (openai default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--launch", action="store_true",
                   help="start our server (role all) on the benchmark model and stop it after")
    p.add_argument("--model-dir", default=None, help="checkpoint for --launch")
    p.add_argument("--shape", choices=SHAPE_NAMES, default="bench-100m",
                   help="--launch: bench-100m (the cached checkpoint) or a shape served with "
                        "random weights from its config.json alone")
    p.add_argument("--server-args", default="",
                   help="--launch: extra engine-serve arguments, e.g. '--device cuda'")
    p.add_argument("--kv-cache-memory", default="1GiB",
                   help="--launch: the server's KV cache size, or 'auto' (sized by the engine)")
    p.add_argument("--dataset-path", default=None, help="local ShareGPT JSON (else random)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for ShareGPT prompt lengths")
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=32000, help="range of random prompt ids")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="one or more rates in req/s; inf sends everything at t = 0")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-warmups", type=int, default=2)
    p.add_argument("--slo", type=parse_slo, default={},
                   help="goodput SLOs in ms, e.g. ttft:500,tpot:50 (also e2el)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: next to --result-json)")
    return p.parse_args(argv)


async def benchmark(args: argparse.Namespace, send: RequestFunc) -> list[dict[str, object]]:
    def workload(num: int, seed: int) -> list[BenchRequest]:
        if args.dataset_path:
            return sharegpt_requests(Path(args.dataset_path), num, args.tokenizer, seed,
                                     args.sharegpt_output_len)
        return random_requests(num, args.random_input_len, args.random_output_len,
                               args.vocab_size, seed)

    if args.num_warmups:
        # Sequential and on other prompts: compiles/allocates once without seeding the cache.
        for request in workload(args.num_warmups, args.seed + 10_000):
            result = await send(request)
            if not result.success:
                raise SystemExit(f"warm-up request failed: {result.error}")
    runs = []
    for index, rate in enumerate(args.request_rate):
        requests = workload(args.num_prompts, args.seed + index)
        results, duration = await run_load(send, requests, rate, args.max_concurrency,
                                           args.seed + index)
        summary = summarize(results, duration, args.slo)
        print_summary(rate, summary)
        runs.append({"request_rate": rate, "summary": summary})
    return runs


async def main_async(args: argparse.Namespace) -> list[dict[str, object]]:
    server = None
    if args.launch:
        from benchmarks.bench_model import CONFIG_ONLY_SHAPES, ensure_bench_model, ensure_shape_dir

        if args.shape in CONFIG_ONLY_SHAPES:
            model_dir = ensure_shape_dir(args.shape, args.model_dir)
        else:
            model_dir = ensure_bench_model(args.model_dir)
        # The bridge only when the load goes through it.
        role = "engine" if args.backend == "grpc" else "all"
        kv_memory = None if args.kv_cache_memory == "auto" else args.kv_cache_memory
        print(f"launching engine-serve --role {role} on {model_dir} ...", flush=True)
        server = launch_server(model_dir, role, *shlex.split(args.server_args),
                               kv_cache_memory=kv_memory)
        args.address = server.grpc_address
        if server.http_url is not None:
            args.base_url = server.http_url + "/v1"
        args.model = args.model or BENCH_MODEL_NAME
        if args.dataset_path and not args.tokenizer:
            from benchmarks.serving_backends import DEMO_TOKENIZER_DIR

            args.tokenizer = str(DEMO_TOKENIZER_DIR)
    try:
        client: GrpcClient | OpenAIClient
        if args.backend == "grpc":
            client = GrpcClient(args.address, args.model or "")
        else:
            model = args.model or await fetch_model_name(args.base_url)
            client = OpenAIClient(args.base_url, model, args.api_key)
        try:
            return await benchmark(args, client)
        finally:
            await client.close()
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    args = parse_args()
    if args.dataset_path and not (args.tokenizer or args.launch):
        raise SystemExit("--dataset-path needs --tokenizer (or --launch) for prompt lengths")
    runs = asyncio.run(main_async(args))
    if args.result_json:
        import datetime
        import platform

        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "args": {k: (v if k != "request_rate" else [str(r) for r in v])
                     for k, v in vars(args).items() if k != "api_key"},
            # inf is not JSON; write it as a string.
            "runs": [{**run, "request_rate": str(run["request_rate"])} for run in runs],
        }
        Path(args.result_json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.result_json}")
    if len(runs) > 1 and (args.plot or args.result_json):
        plot(runs, Path(args.plot or Path(args.result_json).with_suffix(".png")))


if __name__ == "__main__":
    main()
