"""`engine-bridge`: serve the OpenAI REST API in front of a running engine.

SIGTERM or Ctrl-C drains: the listener closes, running requests get up to --drain-timeout
to finish, then the process exits 0. Started by engine-serve (--role all), the bridge serves
on the listening socket its parent bound (so a taken port fails before anything starts),
reports on a socket pair once it serves, and exits when that parent is gone.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

import uvicorn

from protoserve.help_format import DefaultsHelpFormatter
from protoserve.listeners import ListenError, bind_tcp, tcp_address
from protoserve.supervision import SupervisorLink, exit_with_parent
from protoserve.tracing import check_tracing_available
from rest_bridge.app import create_app
from rest_bridge.chat_options import add_chat_args, chat_options_from_args
from rest_bridge.http_limits import limited_protocol
from rest_bridge.http_options import (
    ADMIN_KEY_SHA256_ENV,
    ENGINE_API_KEY_ENV,
    add_http_args,
    limits_from_args,
)
from rest_bridge.settings import BridgeSettings, validate_engine_address

API_KEY_ENV = "PROTOSERVE_API_KEY"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DEFAULT_DRAIN_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine-bridge",
        description="OpenAI-compatible REST bridge: each request becomes a streaming gRPC "
        "call to the protoserve engine.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--engine-address",
        required=True,
        type=_engine_address,
        help="the engine's gRPC address: host:port, unix:/path or unix:///abs/path",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind host")
    parser.add_argument("--port", type=int, default=8000, help="bind port")
    parser.add_argument(
        "--uvicorn-log-level", default="info", choices=_LOG_LEVELS,
        help="log level (access lines at debug/trace)",
    )
    parser.add_argument(
        "--root-path", default="", help="path prefix when served behind a proxy (default: none)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="deadline of each engine call (default: none)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (or set {API_KEY_ENV})",
    )
    parser.add_argument(
        "--engine-api-key",
        default=None,
        help=f"key sent to the engine as 'authorization: Bearer KEY' metadata (or set "
        f"{ENGINE_API_KEY_ENV}; default: the --api-key)",
    )
    parser.add_argument(
        "--metrics-compat", action="store_true",
        help="/metrics also exports vLLM's full metric set under the vllm: prefix",
    )
    parser.add_argument(
        "--otlp-traces-endpoint", default=None, metavar="URL",
        help="export OpenTelemetry spans to this OTLP endpoint (needs pip install "
        "'protoserve[otel]'); traceparent headers reach the engine either way",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT_S, metavar="SECONDS",
        help="on SIGTERM, wait this long for running requests before cancelling them",
    )
    add_http_args(parser)
    add_chat_args(parser)
    # Set by engine-serve for the bridge it supervises (protoserve/cli/bridge_child.py),
    # not by hand:
    # the listening socket it bound, its end of the supervisor socket pair, and its pid.
    for flag in ("--listen-fd", "--supervisor-fd", "--supervisor-pid"):
        parser.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _engine_address(value: str) -> str:
    try:
        return validate_engine_address(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def settings_from_args(args: argparse.Namespace) -> BridgeSettings:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return BridgeSettings(
        engine_address=args.engine_address,
        host=args.host,
        port=args.port,
        request_timeout=args.request_timeout,
        api_key=api_key,
        root_path=args.root_path,
        uvicorn_log_level=args.uvicorn_log_level,
        # One key for both hops is the common case (engine-serve --role all).
        engine_api_key=args.engine_api_key or os.environ.get(ENGINE_API_KEY_ENV) or api_key,
        http_limits=limits_from_args(args),
        allowed_origins=tuple(args.allowed_origins),
        allow_credentials=args.allow_credentials,
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        disable_docs=args.disable_fastapi_docs,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        metrics_compat=args.metrics_compat,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        chat=chat_options_from_args(args),
        drain_timeout=args.drain_timeout,
        admin_key_sha256=os.environ.get(ADMIN_KEY_SHA256_ENV) or None,
    )


class _BridgeServer(uvicorn.Server):
    """uvicorn's server, telling `on_started` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


def main(argv: Sequence[str] | None = None, *, prog: str = "engine-bridge") -> int:
    """`prog` names the command in the one-line start-up errors (engine-serve --role bridge
    runs this in its own process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        check_tracing_available(settings.otlp_traces_endpoint)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(
        level=logging.DEBUG if settings.uvicorn_log_level in ("debug", "trace") else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    supervised = args.supervisor_fd is not None and args.supervisor_pid is not None
    if supervised and not exit_with_parent(args.supervisor_pid):
        return 1  # engine-serve died while we started: nobody to serve for
    try:
        listener = (socket.socket(fileno=args.listen_fd) if args.listen_fd is not None
                    else bind_tcp(settings.host, settings.port, "--port"))
    except ListenError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    scheme = "https" if settings.ssl_certfile else "http"
    address = tcp_address(settings.host, listener.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.uvicorn_log_level,
        # Behind a path-prefix proxy: the server, not the app, owns the root path.
        root_path=settings.root_path,
        # Access lines only when debugging: at serving rates they drown the useful log lines.
        access_log=settings.uvicorn_log_level in ("debug", "trace"),
        timeout_graceful_shutdown=settings.drain_timeout,
        # httptools with header size/count bounds and header/body read timeouts.
        http=limited_protocol(settings.http_limits),
        timeout_keep_alive=settings.http_limits.keep_alive_timeout_s,
        limit_concurrency=settings.http_limits.max_connections,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        ssl_ca_certs=settings.ssl_ca_certs,
        ssl_cert_reqs=settings.ssl_cert_reqs,
    )
    link: SupervisorLink | None = None

    def started() -> None:
        if link is not None:
            link.notify_ready()  # engine-serve announces both servers in one line
        else:
            logger.info("OpenAI API: %s://%s/v1", scheme, address)

    server = _BridgeServer(config, started)
    # uvicorn drains on SIGTERM/SIGINT with handlers of its own, and afterwards re-raises the
    # signal to the handler it replaced: with the default one, SIGTERM would then kill the
    # process (exit -15) after a clean drain. Its own handler there (and before it installs
    # it, while the app starts) makes a signal a drain at any time, and the exit status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    if supervised:
        # The supervisor is gone (even SIGKILLed): drain and exit, freeing the port.
        link = SupervisorLink(args.supervisor_fd,
                              on_gone=lambda: server.handle_exit(signal.SIGTERM, None))
    server.run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
