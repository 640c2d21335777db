"""engine-serve's production-serving flags: back-pressure, deadlines, drain, engine-death
handling, metrics, request logs and tracing (kept apart from cli.py's model flags). The run
loop they drive is protoserve/cli/serve_loop.py."""
from __future__ import annotations

import argparse
from typing import Any

from protoserve.arg_types import parse_bytes


def positive_bytes(text: str) -> int:
    size = parse_bytes(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return size


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving (service mesh)")
    g.add_argument("--grpc-uds", default=None, metavar="PATH",
                   help="also serve gRPC on this Unix socket (a bridge sidecar sharing a volume)")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="requests allowed to wait for admission; more get RESOURCE_EXHAUSTED "
                   "(HTTP 429) with a retry hint (default: unbounded)")
    g.add_argument("--max-n", type=int, default=128,
                   help="most choices one request may ask for (n, best_of, beam width), as "
                   "OpenAI caps n; each costs memory before anything runs")
    g.add_argument("--max-prompt-bytes", type=int, default=None, metavar="BYTES",
                   help="largest prompt accepted before tokenizing (text, token ids or chat "
                   "input); default: 32 bytes per token of the context length")
    g.add_argument("--max-request-memory", type=positive_bytes, default=None, metavar="SIZE",
                   help="host memory the requests in flight may hold together, each estimated "
                   "from its n/best_of, prompt size, max_tokens and logprobs before it is "
                   "accepted: one over it alone gets 400 naming the field, one that does not "
                   "fit now 429 + Retry-After (as --max-queue-len). default: 2 GiB, or half "
                   "the memory available at start-up if less (the model and KV cache are sized "
                   "at start-up; this bounds what requests add; 2 GiB holds about a thousand "
                   "n=128 requests of 256 tokens)")
    g.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="cancel a streaming client that reads nothing for this long")
    g.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Admin/Drain, wait this long for running requests")
    g.add_argument("--max-connection-age", type=float, default=None, metavar="SECONDS",
                   help="send GOAWAY to gRPC connections older than this, so clients rebalance")
    g.add_argument("--engine-hang-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="no step-thread heartbeat for this long = the engine is dead")
    g.add_argument("--keep-alive-on-engine-death", action="store_true",
                   help="keep the process when the engine dies (readiness NOT_SERVING, "
                   "liveness SERVING, for a post-mortem), instead of exiting non-zero for the "
                   "supervisor to restart it")
    g.add_argument("--enable-test-hooks", action="store_true",
                   help="testing only: SIGUSR1 kills the step thread, SIGUSR2 hangs it")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve the engine's Prometheus /metrics on this port")
    g.add_argument("--metrics-compat", action="store_true",
                   help="also export vLLM's full metric set under the vllm: prefix (names, types, "
                   "labels), for dashboards, autoscalers and the Inference Extension")
    g.add_argument("--kv-events-max-pending", type=positive_int, default=1024, metavar="BATCHES",
                   help="KV-event batches (engine steps) a Discovery/WatchKvEvents or "
                   "/v1/kv_events watcher may fall behind before its stream is ended with "
                   "RESOURCE_EXHAUSTED (HTTP 429), so a stalled router never slows the engine "
                   "(default: 1024)")
    g.add_argument("--kv-events-replay-batches", type=non_negative_int, default=1024,
                   metavar="BATCHES",
                   help="last KV-event batches kept so a watcher that reconnects with "
                   "since_sequence_number (or SSE Last-Event-ID) gets what it missed; 0 turns "
                   "replay off (default: 1024)")
    g.add_argument("--disable-log-requests", action="store_true",
                   help="no per-request log line")
    g.add_argument("--max-log-len", type=int, default=0,
                   help="prompt characters a request log line may show (default 0: none)")
    g.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="the bridge's deadline for each engine call (HTTP 504 when it expires)")
    g.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="export OpenTelemetry spans (bridge and engine) to this OTLP endpoint; "
                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc|http/protobuf picks the protocol "
                   "(needs pip install 'protoserve[otel]')")


def grpc_lifecycle_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The GrpcServerConfig fields these flags set."""
    return {"max_connection_age_s": args.max_connection_age,
            "engine_hang_timeout_s": args.engine_hang_timeout}


def bridge_serving_args(args: argparse.Namespace) -> list[str]:
    # The bridge drains its HTTP requests as long as the engine drains their streams.
    extra: list[str] = ["--drain-timeout", str(args.drain_timeout)]
    if args.request_timeout is not None:
        extra += ["--request-timeout", str(args.request_timeout)]
    if args.metrics_compat:
        extra.append("--metrics-compat")
    if args.otlp_traces_endpoint:
        extra += ["--otlp-traces-endpoint", args.otlp_traces_endpoint]
    return extra
