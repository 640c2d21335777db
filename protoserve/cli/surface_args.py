"""engine-serve's network-surface flags (config file, API key, TLS, CORS, REST options) and
what they become for each server: the gRPC server's security settings and the bridge's argv.

The API key reaches a bridge child process through its environment, never its argv, so it
does not show in `ps`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

from engine.server.security import HEALTH_SERVICE, REFLECTION_SERVICES, GrpcTls
from rest_bridge.http_options import ADMIN_KEY_SHA256_ENV, LIMIT_FLAGS, add_http_args

API_KEY_ENV = "PROTOSERVE_API_KEY"
ADMIN_API_KEY_ENV = "PROTOSERVE_ADMIN_API_KEY"


def add_surface_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file of options: every long flag is a key (dashes or "
                   "underscores); the command line wins over the file")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on REST /v1 routes, /tokenize, "
                   f"/detokenize and on gRPC calls (or set {API_KEY_ENV})")
    p.add_argument("--admin-api-key", default=None,
                   help="the operators' key: required on the gRPC Admin service (Abort of any "
                   "request, Drain, LoRA adapters) and on REST /v1/load_lora_adapter and "
                   "/v1/unload_lora_adapter, which the --api-key never opens; without it, Admin "
                   f"is disabled on a server that has an --api-key (or set {ADMIN_API_KEY_ENV})")
    p.add_argument("--grpc-auth-exempt-health", action=argparse.BooleanOptionalAction,
                   default=True, help="gRPC health checks need no API key")
    p.add_argument("--grpc-auth-exempt-reflection", action=argparse.BooleanOptionalAction,
                   default=True, help="gRPC server reflection needs no API key")
    p.add_argument("--grpc-require-client-cert", action="store_true",
                   help="gRPC mTLS: refuse clients without a certificate signed by "
                   "--ssl-ca-certs (also implied by --ssl-cert-reqs 2)")
    p.add_argument("--root-path", default="",
                   help="REST path prefix when behind a proxy (default: none)")
    # CORS, --disable-fastapi-docs and --ssl-*: shared with engine-bridge.
    add_http_args(p)


def resolve_api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def resolve_admin_api_key(args: argparse.Namespace) -> str | None:
    return args.admin_api_key or os.environ.get(ADMIN_API_KEY_ENV) or None


def check_surface_args(args: argparse.Namespace) -> None:
    """Raise ValueError (one line) for combinations neither server can serve."""
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
    if (args.grpc_require_client_cert or args.ssl_cert_reqs) and not args.ssl_ca_certs:
        raise ValueError("client certificates need --ssl-ca-certs (the CA that signs them)")
    if (args.grpc_require_client_cert or args.ssl_ca_certs) and args.ssl_keyfile is None:
        raise ValueError("client certificates need TLS (--ssl-keyfile and --ssl-certfile)")
    if args.allow_credentials and "*" in args.allowed_origins:
        raise ValueError("--allow-credentials cannot be combined with --allowed-origins '*'; "
                         "list the origins explicitly")


def grpc_security(args: argparse.Namespace) -> dict[str, object]:
    """Keyword arguments for GrpcServerConfig: API key, exempt services and TLS."""
    exempt: list[str] = []
    if args.grpc_auth_exempt_health:
        exempt.append(HEALTH_SERVICE)
    if args.grpc_auth_exempt_reflection:
        exempt.extend(REFLECTION_SERVICES)
    tls = None
    if args.ssl_keyfile is not None:
        tls = GrpcTls(
            keyfile=args.ssl_keyfile,
            certfile=args.ssl_certfile,
            client_ca_file=args.ssl_ca_certs,
            require_client_cert=bool(args.grpc_require_client_cert or args.ssl_cert_reqs == 2),
        )
    return {"api_key": resolve_api_key(args), "admin_api_key": resolve_admin_api_key(args),
            "auth_exempt_services": tuple(exempt), "tls": tls}


def bridge_surface_args(args: argparse.Namespace) -> list[str]:
    """The bridge's share of the surface flags (without the key; see bridge_env)."""
    extra = ["--root-path", args.root_path]
    if args.allowed_origins:
        extra += ["--allowed-origins", json.dumps(args.allowed_origins)]
        extra += ["--allowed-methods", json.dumps(args.allowed_methods)]
        extra += ["--allowed-headers", json.dumps(args.allowed_headers)]
    if args.allow_credentials:
        extra.append("--allow-credentials")
    if args.disable_fastapi_docs:
        extra.append("--disable-fastapi-docs")
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        value = getattr(args, flag)
        if value is not None:
            extra += ["--" + flag.replace("_", "-"), value]
    extra += ["--ssl-cert-reqs", str(args.ssl_cert_reqs)]
    for flag in LIMIT_FLAGS:
        extra += [flag, str(getattr(args, flag.removeprefix("--").replace("-", "_")))]
    return extra


def bridge_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a bridge child: the key for REST clients and for the engine hop."""
    env = dict(os.environ)
    # The operators' key stays out of the bridge's process: the runtime LoRA routes, its
    # only Admin calls, check the caller's key against its SHA-256 (rest_bridge/middleware.py)
    # and the engine checks it again.
    env.pop(ADMIN_API_KEY_ENV, None)
    env.pop(ADMIN_KEY_SHA256_ENV, None)
    key = resolve_api_key(args)
    if key:
        env[API_KEY_ENV] = key
    admin_key = resolve_admin_api_key(args)
    if admin_key:
        env[ADMIN_KEY_SHA256_ENV] = hashlib.sha256(admin_key.encode()).hexdigest()
    return env
