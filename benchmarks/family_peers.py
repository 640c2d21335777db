"""Served throughput on the family benchmark models (benchmarks/family_models.py): protoserve
and vLLM's CPU build, the same weights, driven by the same third-party load generator
(`vllm bench serve`), engines alternated in rounds; transformers' in-process `generate` as
the third peer through benchmarks/offline_throughput.py.

vLLM's CPU build lives in its own virtual environment (never a project dependency; see the
peers notes): pass `--vllm-venv DIR`. Without it only protoserve runs.

    .venv/bin/python -m benchmarks.family_peers --shape qwen3-moe --vllm-venv ../venv-vllm \
        --rounds 2 --concurrency 1 16 --json benchmarks/results/cpu-DATE/family-qwen3-moe.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.family_models import FAMILY_SHAPES, active_weight_bytes, ensure_family_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED_NAME = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before it served")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return time.monotonic() - start
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not serve within {timeout_s} s")


def start_protoserve(model_dir: Path, port: int) -> subprocess.Popen:
    args = [str(REPO_ROOT / ".venv/bin/engine-serve"), "--model", str(model_dir),
            "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(_free_port()), "--served-model-name", SERVED_NAME,
            "--max-model-len", "2048", "--kv-cache-memory", "2GiB", "--log-level", "warning",
            "--disable-log-requests"]
    return subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)


def start_vllm(venv: Path, model_dir: Path, port: int, both_cores: bool) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    if both_cores:  # its faster setting on a quiet machine (see the peers notes)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0-1"
    args = [str(venv / "bin/vllm"), "serve", str(model_dir), "--dtype", "bfloat16",
            "--max-model-len", "2048", "--served-model-name", SERVED_NAME, "--port", str(port)]
    return subprocess.Popen(args, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def bench(venv: Path, port: int, model_dir: Path, concurrency: int, num_prompts: int,
          input_len: int, output_len: int) -> dict[str, float]:
    args = [str(venv / "bin/vllm"), "bench", "serve", "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", SERVED_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--ignore-eos", "--seed", str(int(time.time()) % 100000)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    figures = {}
    for key, pattern in {"output_tok_s": r"Output token throughput \(tok/s\):\s+([\d.]+)",
                         "median_tpot_ms": r"Median TPOT \(ms\):\s+([\d.]+)",
                         # vllm bench serve prints p99s by default: whether decode rows
                         # starve behind other requests' prefill chunks.
                         "p99_tpot_ms": r"P99 TPOT \(ms\):\s+([\d.]+)",
                         "median_ttft_ms": r"Median TTFT \(ms\):\s+([\d.]+)"}.items():
        match = re.search(pattern, out)
        if match:
            figures[key] = float(match.group(1))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(FAMILY_SHAPES), required=True)
    parser.add_argument("--vllm-venv", type=Path, required=True,
                        help="venv with vllm-cpu (its `vllm bench serve` drives every server)")
    parser.add_argument("--engines", nargs="+", default=["protoserve", "vllm-both-cores"],
                        choices=["protoserve", "vllm", "vllm-both-cores"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = ensure_family_model(args.shape)
    total_bytes, active_bytes = active_weight_bytes(args.shape)
    results: list[dict] = []
    for round_index in range(args.rounds):
        for engine in args.engines:
            port = _free_port()
            process = (start_protoserve(model_dir, port) if engine == "protoserve"
                       else start_vllm(args.vllm_venv, model_dir, port,
                                       both_cores=engine == "vllm-both-cores"))
            try:
                startup_s = _wait_ready(f"http://127.0.0.1:{port}", process, 600)
                for concurrency in args.concurrency:
                    load = os.getloadavg()[0]
                    num = args.num_prompts if concurrency > 1 else max(4, args.num_prompts // 8)
                    figures = bench(args.vllm_venv, port, model_dir, concurrency, num,
                                    args.input_len, args.output_len)
                    row = {"round": round_index, "engine": engine, "concurrency": concurrency,
                           "startup_s": round(startup_s, 1), "load_before": load, **figures}
                    print(json.dumps(row), flush=True)
                    results.append(row)
            finally:
                stop(process)
    summary = {}
    for concurrency in args.concurrency:
        for engine in args.engines:
            rates = [r["output_tok_s"] for r in results
                     if r["engine"] == engine and r["concurrency"] == concurrency
                     and "output_tok_s" in r]
            if rates:
                summary[f"{engine}@{concurrency}"] = statistics.median(rates)
    report = {"shape": args.shape, "model_dir": str(model_dir), "weight_bytes": total_bytes,
              "active_bytes_per_token": active_bytes, "rows": results, "median_tok_s": summary,
              "date": time.strftime("%Y-%m-%d"), "machine": os.uname().nodename}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
