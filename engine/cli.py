"""`engine-serve`: the engine (gRPC) and the OpenAI bridge (REST) as two processes.

    engine-serve                          # built-in demo model, gRPC :50051, REST :8000
    engine-serve --model /path/to/hf-dir  # any local Llama/Mistral/Qwen2 directory or hub id
    engine-serve --role engine            # gRPC only (run the bridge elsewhere)
    engine-serve --role bridge --engine-address host:50051

With `--role all` (default) the bridge runs as a child process and reaches the engine over a
Unix domain socket, so it never shares the engine's GIL.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.cli_serving import (
    add_serving_arguments,
    bridge_serving_args,
    grpc_lifecycle_kwargs,
    serve,
)
from engine.config import (
    ATTENTION_BACKENDS,
    ENGINE_CORE_MODES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from engine.config_file import parse_args_with_config
from engine.serve_args import (
    add_surface_args,
    bridge_env,
    bridge_surface_args,
    check_surface_args,
    grpc_security,
    resolve_api_key,
)
from engine.errors import ModelLoadError
from engine.structured.registry import DEFAULT_BACKEND, is_available, known_backends
from protoserve.tracing import check_tracing_available


logger = logging.getLogger("engine.cli")

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1.5G', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4GiB, 512MiB)")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[(unit or "").lower()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory or hub id (default: the demo model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use")
    p.add_argument("--role", choices=("all", "engine", "bridge"), default="all")
    p.add_argument("--host", default="0.0.0.0", help="bind address of both servers")
    p.add_argument("--port", type=int, default=8000, help="REST (OpenAI bridge) port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    p.add_argument("--engine-address", default=None, help="engine gRPC address (role bridge)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto = bfloat16 on CPU (float16 is never used on CPU)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when a CUDA device is visible, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights from config.json alone (benchmarks without "
                        "a checkpoint)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto = cpu_paged (our kernels) on CPU when they build, flash_attn or "
                        "cuda_paged on CUDA, else torch")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None, help="e.g. 4GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="CUDA: share of device memory for weights + activations + KV cache")
    p.add_argument("--num-kv-blocks", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    p.add_argument("--chat-template", default=None, help="a template file or the template text")
    p.add_argument("--chat-template-content-format", choices=("auto", "string", "openai"),
                   default="auto", help="message content as a string or a list of typed "
                   "parts (default: detected from the template)")
    # Tool calling and media are the bridge's work; these are handed on to it.
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="parse tool calls out of the model's output (needs --tool-call-parser)")
    p.add_argument("--tool-call-parser", choices=("hermes", "llama3_json", "mistral"), default=None)
    p.add_argument("--allowed-media-domains", nargs="*", default=None,
                   help="hosts whose http(s) media URLs requests may name (default: none)")
    p.add_argument("--max-media-bytes", type=parse_bytes, default=None,
                   help="largest decoded media item a request may carry (e.g. 20MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("auto", "generate", "embed"), default="auto",
                   help="auto: encoders (BERT) embed, decoders generate (and embed on request)")
    p.add_argument("--pooling-type", choices=("auto", "mean", "cls", "last"), default="auto",
                   help="embeddings: auto = the sentence-transformers config, else cls (encoders) "
                        "or last (decoders)")
    p.add_argument("--embedding-model", default=None,
                   help="a second model served side by side for embeddings")
    p.add_argument("--embedding-served-model-name", nargs="+", default=None,
                   help="name(s) of --embedding-model (default: its path)")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="most top logprobs a request may ask for per token")
    p.add_argument("--guided-decoding-backend", choices=known_backends(), default=DEFAULT_BACKEND,
                   help="structured-output backend of requests that name none")
    p.add_argument("--engine-core", choices=ENGINE_CORE_MODES, default="process",
                   help="process: the step loop runs in a process of its own, in parallel with "
                        "the gRPC threads; thread: on a thread of the serving process")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="the REST bridge's log level (access lines at debug/trace)")
    p.add_argument("--log-level", default="info")
    add_serving_arguments(p)
    add_surface_args(p)
    return p


def engine_config_from_args(args: argparse.Namespace, model: str) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=model,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            served_model_names=tuple(args.served_model_name or ()),
            chat_template=args.chat_template,
            chat_template_content_format=args.chat_template_content_format,
            seed=args.seed,
            device=args.device,
            load_format=args.load_format,
            max_logprobs=args.max_logprobs,
            task=args.task,
            pooling_type=args.pooling_type,
            attention_backend=args.attention_backend,
        ),
        embedding_model=_embedding_model_config(args),
        guided_decoding_backend=_guided_decoding_backend(args),
        engine_core=args.engine_core,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.scheduling_policy,
        ),
    )


def _guided_decoding_backend(args: argparse.Namespace) -> str:
    name = args.guided_decoding_backend
    if not is_available(name):
        raise ValueError(f"--guided-decoding-backend {name}: its library is not installed "
                         f"(pip install 'protoserve[structured-{name}]')")
    return name


def _embedding_model_config(args: argparse.Namespace) -> ModelConfig | None:
    if not args.embedding_model:
        return None
    return ModelConfig(
        model=args.embedding_model,
        dtype=args.dtype,
        served_model_names=tuple(args.embedding_served_model_name or ()),
        seed=args.seed,
        device=args.device,
        task="embed",
        pooling_type=args.pooling_type,
    )


def start_bridge(engine_address: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rest_bridge", "--engine-address", engine_address,
           "--host", args.host, "--port", str(args.port),
           "--uvicorn-log-level", args.uvicorn_log_level, *bridge_feature_args(args),
           *bridge_serving_args(args), *bridge_surface_args(args)]
    # The API key travels in the environment, not argv (visible to every local user).
    return subprocess.Popen(cmd, env=bridge_env(args))


def bridge_feature_args(args: argparse.Namespace) -> list[str]:
    """The bridge's share of the command line: tool-call parsing and media limits."""
    extra: list[str] = []
    if args.enable_auto_tool_choice:
        extra.append("--enable-auto-tool-choice")
    if args.tool_call_parser:
        extra += ["--tool-call-parser", args.tool_call_parser]
    if args.allowed_media_domains:
        extra += ["--allowed-media-domains", *args.allowed_media_domains]
    if args.max_media_bytes is not None:
        extra += ["--max-media-bytes", str(args.max_media_bytes)]
    return extra


async def run_engine(config: EngineConfig, args: argparse.Namespace, uds: str | None) -> int:
    from engine.server.grpc_server import EngineServer, GrpcServerConfig

    server = EngineServer(
        config, GrpcServerConfig(
            args.host, args.grpc_port, uds, **grpc_lifecycle_kwargs(args), **grpc_security(args)
        )
    )
    # Drain on SIGTERM/Admin.Drain, exit 1 on engine death: engine/cli_serving.py.
    return await serve(server, args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args_with_config(build_parser(), argv)
        check_surface_args(args)
        check_tracing_available(args.otlp_traces_endpoint)
        if args.enable_auto_tool_choice and not args.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    except ValueError as exc:  # ConfigFileError included: one line, the key named
        print(f"engine-serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role == "bridge":
        if not args.engine_address:
            print("error: --role bridge needs --engine-address", file=sys.stderr)
            return 2
        from rest_bridge.cli import main as bridge_main

        return bridge_main(["--engine-address", args.engine_address, "--host", args.host,
                            "--port", str(args.port), "--uvicorn-log-level", args.uvicorn_log_level,
                            *bridge_feature_args(args), *bridge_serving_args(args),
                            *bridge_surface_args(args),
                            *(["--api-key", key] if (key := resolve_api_key(args)) else [])])
    model = args.model
    if model is None:
        from engine.demo import DEMO_MODEL_NAME, ensure_demo_model

        model = str(ensure_demo_model())
        if not args.served_model_name:
            args.served_model_name = [DEMO_MODEL_NAME]
        logger.info("no --model given: serving the built-in demo model (random weights, "
                    "meaningless text) from %s", model)
    try:
        config = engine_config_from_args(args, model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bridge = None
    uds = f"unix:{args.grpc_uds}" if args.grpc_uds else None
    if args.role == "all":
        if uds is None:
            uds_path = Path(tempfile.gettempdir()) / f"protoserve-{os.getpid()}.sock"
            uds = f"unix:{uds_path}"
        bridge = start_bridge(uds, args)
    try:
        return asyncio.run(run_engine(config, args, uds))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bridge is not None:
            bridge.terminate()
            try:
                bridge.wait(10)
            except subprocess.TimeoutExpired:
                bridge.kill()
        if uds:
            Path(uds.removeprefix("unix:")).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
