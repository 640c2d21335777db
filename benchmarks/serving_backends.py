"""Streaming clients for the online benchmarks (benchmarks/serving.py, benchmarks/frontend_tax.py)
and a launcher for our own server on the benchmark checkpoint.

Each client sends one request and timestamps every streamed chunk on the client side, which is
how `vllm bench serve` defines its latencies: TTFT = send -> first chunk that carries output,
ITL = every later gap between such chunks.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_model import is_config_only

REPO_ROOT = Path(__file__).resolve().parent.parent
# The demo tokenizer (2,000 ids) stands in for the benchmark checkpoint's missing one: prompts
# are token ids, and ids past its vocabulary only make the streamed text empty.
DEMO_TOKENIZER_DIR = Path("~/.cache/protoserve/demo-llama-v1").expanduser()
BENCH_MODEL_NAME = "bench"


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    # Gaps between consecutive output chunks (a chunk may hold several tokens).
    itl_s: list[float] = field(default_factory=list)
    start_s: float = 0.0  # perf_counter at send, for the benchmark's duration
    error: str = ""


RequestFunc = Callable[[BenchRequest], Awaitable[RequestResult]]


class GrpcClient:
    """protoserve.v1 Inference.Generate over one shared grpc.aio channel (HTTP/2 multiplexes
    every stream, as a real gRPC client would)."""

    def __init__(self, address: str, model: str = "") -> None:
        import grpc

        from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

        self._pb, self._common = inference_pb2, common_pb2
        # Large windows so many concurrent streams are not throttled by flow control.
        self._channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_concurrent_streams", 1 << 16)]
        )
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._model = model

    async def close(self) -> None:
        await self._channel.close()

    async def __call__(self, request: BenchRequest) -> RequestResult:
        common = self._common
        sampling = common.SamplingParams(
            temperature=0.0, max_tokens=request.output_len, ignore_eos=True,
            min_tokens=request.output_len,
        )
        kwargs: dict[str, object] = {"model": self._model, "sampling": sampling,
                                     "return_text": False}
        if isinstance(request.prompt, str):
            kwargs["text"] = request.prompt
            kwargs["return_text"] = True
        else:
            kwargs["token_ids"] = common.TokenIds(ids=request.prompt)
        message = self._pb.GenerateRequest(**kwargs)
        result = RequestResult(prompt_len=request.prompt_len)
        start = last = time.perf_counter()
        result.start_s = start
        counted = 0
        try:
            async for event in self._stub.Generate(message):
                kind = event.WhichOneof("event")
                if kind == "delta" and event.delta.token_ids:
                    now = time.perf_counter()
                    if counted == 0:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    counted += len(event.delta.token_ids)
                elif kind == "usage":
                    result.output_tokens = event.usage.completion_tokens
                    if event.usage.prompt_tokens:
                        result.prompt_len = event.usage.prompt_tokens
            result.e2e_s = time.perf_counter() - start
            result.output_tokens = result.output_tokens or counted
            result.success = counted > 0
        except Exception as error:  # one failed request is reported, not fatal
            result.error = f"{type(error).__name__}: {error}"
        return result


class OpenAIClient:
    """Streaming `/v1/completions` (SSE) through httpx, against any OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No connection cap: --max-concurrency is the only limit on requests in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                         limits=limits, timeout=httpx.Timeout(None))
        self._model = model

    async def close(self) -> None:
        await self._client.aclose()

    async def __call__(self, request: BenchRequest) -> RequestResult:
        body = {
            "model": self._model, "prompt": request.prompt, "max_tokens": request.output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            # Exact output lengths, so TPOT and throughput compare across servers.
            "ignore_eos": True, "min_tokens": request.output_len,
        }
        result = RequestResult(prompt_len=request.prompt_len)
        start = last = time.perf_counter()
        result.start_s = start
        chunks = 0
        try:
            async with self._client.stream("POST", "/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    return result
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    payload = json.loads(data)
                    if payload.get("usage"):
                        result.output_tokens = payload["usage"].get("completion_tokens", 0)
                    # A chunk with choices carries output even when its text is empty (ids
                    # beyond the tokenizer, or an incomplete UTF-8 sequence).
                    if payload.get("choices"):
                        now = time.perf_counter()
                        if chunks == 0:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
            result.e2e_s = time.perf_counter() - start
            result.output_tokens = result.output_tokens or chunks
            result.success = chunks > 0
        except Exception as error:
            result.error = f"{type(error).__name__}: {error}"
        return result


async def fetch_model_name(base_url: str) -> str:
    import httpx

    async with httpx.AsyncClient() as client:
        reply = await client.get(base_url.rstrip("/") + "/models", timeout=10.0)
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]


def launch_server(model_dir: Path, role: str, *extra_args: str,
                  kv_cache_memory: str | None = "1GiB"):  # -> tests' EngineProcess
    """Start `engine-serve` on 127.0.0.1 (free ports) and wait until it serves.

    Reuses the tests' launcher; the later `--dtype` overrides its float32 test default
    (argparse keeps the last value). `kv_cache_memory` None lets the engine size the cache
    (on CUDA: --gpu-memory-utilization after its profiling pass). A model directory without
    weights is served with `--load-format dummy`."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from engine_process import start_engine

    args = ["--dtype", "bfloat16", "--served-model-name", BENCH_MODEL_NAME,
            "--disable-log-requests"]
    if not (model_dir / "tokenizer.json").exists():
        tokenizer_dir = DEMO_TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            from engine.demo.builder import ensure_demo_model

            tokenizer_dir = ensure_demo_model()
        args += ["--tokenizer", str(tokenizer_dir)]
    if is_config_only(model_dir):
        args += ["--load-format", "dummy"]
    return start_engine(model_dir, *args, *extra_args, role=role,
                        kv_cache_memory=kv_cache_memory)
