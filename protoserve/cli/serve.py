"""`engine-serve`: the engine (gRPC) and the OpenAI bridge (REST) as two processes.

    engine-serve                          # built-in demo model, gRPC :50051, REST :8000
    engine-serve --model /path/to/hf-dir  # a model directory or hub id (README lists the families)
    engine-serve --role engine            # gRPC only (run the bridge elsewhere)
    engine-serve --role bridge --engine-address host:50051

With `--role all` (default) the bridge runs as a child process and reaches the engine over a
Unix domain socket, so it never shares the engine's GIL. A port that is taken stops start-up
with one line; if the bridge or the engine core dies, engine-serve exits 1; SIGTERM drains
both and exits 0 (docs/architecture.md, "Start-up and supervision").
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import (
    ENGINE_CORE_MODES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from engine.errors import InvalidRequestError, ModelLoadError
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import speculative_config_arg
from engine.structured.backend_names import BackendChoice, accepted_names, resolve_backend
from protoserve.cli.cache_args import add_cache_args
from protoserve.cli.config_file import parse_args_with_config
from protoserve.cli.lora_args import add_lora_args, lora_config_from_args
from protoserve.cli.parallel_args import (
    add_parallel_args, parallel_config_from_args, serve_headless,
)
from protoserve.cli.parser_args import add_output_parser_args, check_output_parser_args
from protoserve.cli.serving_args import add_serving_arguments, grpc_lifecycle_kwargs
from protoserve.cli.surface_args import (
    add_surface_args,
    check_surface_args,
    grpc_security,
    resolve_api_key,
)
from protoserve.help_format import DefaultsHelpFormatter
from protoserve.listeners import ListenError, bind_tcp, check_tcp, check_unix
from protoserve.tracing import check_tracing_available
from rest_bridge.chat_options import add_chat_args, chat_options_from_args

if TYPE_CHECKING:
    from protoserve.cli.bridge_child import BridgeChild


logger = logging.getLogger("protoserve.cli.serve")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-serve", description=__doc__,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model directory or hub id (org/name: downloaded once into the "
                   "Hugging Face cache; HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT apply) "
                   "(default: the demo model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--revision", default=None,
                   help="hub ids: the branch, tag or commit of --model (default: main)")
    p.add_argument("--tokenizer-revision", default=None,
                   help="hub ids: the branch, tag or commit of the tokenizer (default: the "
                   "--model snapshot's tokenizer, or the default branch of a --tokenizer hub id)")
    p.add_argument("--download-dir", default=None,
                   help="hub ids: the Hugging Face cache directory to download into and "
                   "load from (default: HF_HUB_CACHE, ~/.cache/huggingface/hub)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use (default: the --model value)")
    p.add_argument("--role", choices=("all", "engine", "bridge"), default="all",
                   help="all: the engine (gRPC) and the REST bridge as its child process; "
                   "engine: gRPC only; bridge: REST only, in front of --engine-address")
    p.add_argument("--host", default="0.0.0.0", help="bind address of both servers")
    p.add_argument("--port", type=int, default=8000, help="REST (OpenAI bridge) port")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port")
    p.add_argument("--engine-address", default=None,
                   help="engine gRPC address, host:port or unix:/path (role bridge; default: none)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto = bfloat16 on CPU (float16 is never used on CPU)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="auto",
                   help="weights: auto = as the checkpoint stores them (compressed-tensors "
                   "W8A16/W4A16, GPTQ, AWQ, and a .gguf file as --model: Q8_0/Q4_0 native, "
                   "other GGUF types dequantized at load); int8 (per channel) / int4 "
                   "(groups of 128): round-to-nearest at load time from bf16/float32 weights")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when a CUDA device is visible, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="auto: safetensors when the checkpoint has them, else PyTorch "
                        ".bin/.pt (pt: read with torch.load weights_only); dummy: random "
                        "weights from config.json alone (benchmarks without a checkpoint)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + output) in tokens (default: the model's "
                   "config)")
    add_cache_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most sequences running in one step (batch size)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens one step computes (long prompts are prefilled in chunks)")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="admission order: arrival, or each request's priority (then arrival)")
    p.add_argument("--chat-template", default=None,
                   help="a template file or the template text (default: the model's)")
    p.add_argument("--chat-template-content-format", choices=("auto", "string", "openai"),
                   default="auto", help="message content as a string or a list of typed "
                   "parts (default: auto, detected from the template)")
    # Tool calling, media and response details are the bridge's work: its own flags,
    # handed on to it (protoserve/cli/bridge_child.py).
    add_chat_args(p)
    add_output_parser_args(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random generator that requests without a seed sample "
                   "from, and of --load-format dummy weights")
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
    p.add_argument("--guided-decoding-backend", default="auto", metavar="NAME[:OPTIONS]",
                   help="structured-output backend of requests that name none: any name the "
                   f"reference server accepts ({', '.join(accepted_names())}), served by the "
                   "best installed backend, with options such as disable-any-whitespace, "
                   "any-whitespace, disable-additional-properties")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|PATH",
                   help="request defaults for temperature, top_p, top_k, min_p, "
                   "repetition_penalty and max_tokens: auto = the model's "
                   "generation_config.json, vllm = the engine's own, or a directory/file")
    p.add_argument("--override-generation-config", type=_json_object, default=None,
                   metavar="JSON", help="defaults over --generation-config's, e.g. "
                   "'{\"temperature\": 0.5}' (generation_config.json or SamplingParams names)")
    p.add_argument("--speculative-config", type=speculative_config_arg, default=None,
                   metavar="JSON", help="speculative decoding, the reference server's shape: "
                   "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                   "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}', or method "
                   "draft_model with \"model\": a small model's directory (same tokenizer), "
                   "or eagle with \"model\": an EAGLE-1 head's directory (default: off)")
    p.add_argument("--engine-core", choices=ENGINE_CORE_MODES, default="process",
                   help="process: the step loop runs in a process of its own, in parallel with "
                        "the gRPC threads; thread: on a thread of the serving process")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="the REST bridge's log level (access lines at debug/trace)")
    p.add_argument("--log-level", default="info",
                   help="log level of the engine processes: debug, info, warning, error")
    add_lora_args(p)
    add_parallel_args(p)
    add_serving_arguments(p)
    add_surface_args(p)
    return p


def engine_config_from_args(args: argparse.Namespace, model: str) -> EngineConfig:
    """Hub ids (--model, --tokenizer, --embedding-model) are downloaded here, once, before
    anything starts: the config carries their snapshot directories to every process.
    Raises ModelLoadError when one cannot be had."""
    # Imported here, as every torch-importing module: a start-up that fails its argument
    # or port checks, and `--role bridge`, never pay seconds of torch and transformers.
    from engine.models.hub import local_model_config

    model_config = local_model_config(ModelConfig(
        model=model,
        tokenizer=args.tokenizer,
        revision=args.revision,
        tokenizer_revision=args.tokenizer_revision,
        download_dir=args.download_dir,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        served_model_names=tuple(args.served_model_name or ()),
        chat_template=args.chat_template,
        chat_template_content_format=args.chat_template_content_format,
        seed=args.seed,
        device=args.device,
        load_format=args.load_format,
        quantization=args.quantization,
        max_logprobs=args.max_logprobs,
        task=args.task,
        pooling_type=args.pooling_type,
        attention_backend=args.attention_backend,
    ))
    return EngineConfig(
        model=model_config,
        embedding_model=_embedding_model_config(args),
        guided_decoding_backend=(guided := _guided_decoding_backend(args)).backend,
        guided_decoding_options=guided.options,
        generation_defaults=_generation_defaults(args, model_config.model),
        engine_core=args.engine_core,
        lora=lora_config_from_args(args),
        speculative=args.speculative_config,
        parallel=parallel_config_from_args(args),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=args.kv_cache_memory,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            kv_cache_dtype=args.kv_cache_dtype,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.scheduling_policy,
        ),
    )


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _generation_defaults(args: argparse.Namespace, model: str) -> tuple:
    from engine.models.generation_config import generation_defaults

    defaults = generation_defaults(args.generation_config, model, args.override_generation_config)
    try:  # a default the engine would refuse fails start-up, not every request
        SamplingParams(**{k: v for k, v in defaults if k != "max_tokens"}).validate()
    except InvalidRequestError as exc:
        raise ValueError(f"generation config: {exc.message}") from None
    if defaults:
        logger.info("request defaults from the generation config: %s",
                    ", ".join(f"{k}={v}" for k, v in defaults))
    return defaults


def _guided_decoding_backend(args: argparse.Namespace) -> BackendChoice:
    try:
        return resolve_backend(args.guided_decoding_backend, field="--guided-decoding-backend")
    except InvalidRequestError as exc:
        raise ValueError(f"--guided-decoding-backend: {exc.message}") from None


def _embedding_model_config(args: argparse.Namespace) -> ModelConfig | None:
    from engine.models.hub import local_model_config

    if not args.embedding_model:
        return None
    return local_model_config(ModelConfig(
        model=args.embedding_model,
        download_dir=args.download_dir,
        dtype=args.dtype,
        served_model_names=tuple(args.embedding_served_model_name or ()),
        seed=args.seed,
        device=args.device,
        task="embed",
        pooling_type=args.pooling_type,
    ))


async def run_engine(config: EngineConfig, args: argparse.Namespace, uds: str | None,
                     bridge: BridgeChild | None = None) -> int:
    from protoserve.cli.serve_loop import serve
    from engine.server.grpc_server import EngineServer, GrpcServerConfig

    server = EngineServer(
        config, GrpcServerConfig(
            args.host, args.grpc_port, uds, **grpc_lifecycle_kwargs(args), **grpc_security(args)
        )
    )
    # Drain on SIGTERM/Admin.Drain, exit 1 when the engine or the bridge dies: serve_loop.py.
    return await serve(server, args, bridge)


def check_listeners(args: argparse.Namespace) -> socket.socket | None:
    """Fail before anything starts when a port is taken (ListenError, one line). Returns the
    REST listener for role all: bound here and handed to the bridge child, so its port is
    ours from now on and the bridge cannot fail to bind it."""
    check_tcp(args.host, args.grpc_port, "--grpc-port")
    if args.grpc_uds:
        check_unix(args.grpc_uds, "--grpc-uds")
    if args.metrics_port is not None:
        check_tcp(args.host, args.metrics_port, "--metrics-port")
    return bind_tcp(args.host, args.port, "--port") if args.role == "all" else None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args_with_config(build_parser(), argv)
        check_surface_args(args)
        check_tracing_available(args.otlp_traces_endpoint)
        chat_options_from_args(args)  # the bridge's own checks, before anything starts
        check_output_parser_args(args)  # loads --tool-parser-plugin into this process
    except ValueError as exc:  # ConfigFileError included: one line, the key named
        print(f"engine-serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # huggingface_hub's HTTP client logs every request of a download at INFO.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    if args.role == "bridge":
        if not args.engine_address:
            print("engine-serve: error: --role bridge needs --engine-address", file=sys.stderr)
            return 2
        from protoserve.cli.bridge_child import bridge_args
        from rest_bridge.cli import main as bridge_main

        return bridge_main(["--engine-address", args.engine_address, *bridge_args(args),
                            *(["--api-key", key] if (key := resolve_api_key(args)) else [])],
                           prog="engine-serve")
    if args.headless:  # no listeners, no bridge: only this node's ranks
        return serve_headless(lambda: engine_config_from_args(args, args.model))
    from protoserve.cli.serve_loop import catch_stop_signals

    catch_stop_signals()
    try:
        rest_listener = check_listeners(args)
    except ListenError as exc:
        print(f"engine-serve: error: {exc}", file=sys.stderr)
        return 1
    try:
        return _serve_engine(args, rest_listener)
    finally:
        # The interpreter's final garbage collection walks every object torch and the model
        # made (a second or more); nothing left needs collecting at exit.
        gc.freeze()


def _serve_engine(args: argparse.Namespace, rest_listener: socket.socket | None) -> int:
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
    except ModelLoadError as exc:  # a hub id that cannot be downloaded
        print(f"error: {exc}", file=sys.stderr)
        return 1
    bridge = None
    uds = f"unix:{args.grpc_uds}" if args.grpc_uds else None
    if rest_listener is not None:
        from protoserve.cli.bridge_child import BridgeChild

        if uds is None:
            uds_path = Path(tempfile.gettempdir()) / f"protoserve-{os.getpid()}.sock"
            uds = f"unix:{uds_path}"
        bridge = BridgeChild(uds, args, rest_listener)
    try:
        return asyncio.run(run_engine(config, args, uds, bridge))
    except ListenError as exc:
        print(f"engine-serve: error: {exc}", file=sys.stderr)
        return 1
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bridge is not None:
            # Already draining since the engine's drain began (SIGTERM): this waits for it.
            bridge.stop(args.drain_timeout + 5.0)
        if uds:
            Path(uds.removeprefix("unix:")).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
