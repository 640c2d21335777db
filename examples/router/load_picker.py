#!/usr/bin/env python3
"""Least-load replica picker for Envoy (examples/envoy/envoy-least-load.yaml).

Envoy has no load-balancing policy that calls an RPC to choose a host: its LEAST_REQUEST
counts only the requests Envoy itself has open, and its ORCA-weighted policy needs load
reports in every response's trailers. This picker fills the gap the way the Gateway API
Inference Extension's endpoint picker does, in miniature:

    every --interval seconds: Discovery/GetLoad on each replica (in parallel, short deadline)
    GET /pick   -> 200, body "IP:PORT" of the least-loaded ready replica (503 if none)

Envoy's Lua filter asks /pick once per request and puts the answer in
`x-envoy-original-dst-host`; an ORIGINAL_DST cluster with `use_http_header` then sends the
request there. Load = requests running + waiting; ties go to the emptier KV cache. Draining
or unreachable replicas are skipped. The hop costs about a millisecond on one machine; for
cache-aware routing, a picker would also follow Discovery/WatchKvEvents and prefer the
replica that holds the longest prefix of the prompt (protoserve/kv_block_hashes.py).

    python examples/router/load_picker.py --replicas replica-a:50051,replica-b:50051 --port 9000
"""
from __future__ import annotations

import argparse
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from protoserve.v1 import discovery_pb2, discovery_pb2_grpc


@dataclass(frozen=True)
class ReplicaLoad:
    address: str  # IP:PORT, as ORIGINAL_DST needs it
    load: discovery_pb2.GetLoadResponse


def pick(loads: list[ReplicaLoad]) -> str | None:
    """The least-loaded replica that takes requests, or None."""
    ready = [r for r in loads if not r.load.draining]
    if not ready:
        return None
    best = min(ready, key=lambda r: (r.load.num_requests_running + r.load.num_requests_waiting,
                                     r.load.kv_cache_usage))
    return best.address


class LoadPoller:
    def __init__(self, replicas: list[str], interval_s: float, timeout_s: float) -> None:
        self.replicas = replicas
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.loads: list[ReplicaLoad] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._pool = ThreadPoolExecutor(max(len(replicas), 1))

    def poll_once(self) -> None:
        results = self._pool.map(self._load_of, self.replicas)
        self.loads = [r for r in results if r is not None]

    def run(self) -> None:
        while True:
            self.poll_once()
            time.sleep(self.interval_s)

    def _load_of(self, replica: str) -> ReplicaLoad | None:
        host, port = replica.rsplit(":", 1)
        try:
            address = f"{socket.gethostbyname(host)}:{port}"  # the replica's IP may change
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.insecure_channel(address)
            load = discovery_pb2_grpc.DiscoveryStub(channel).GetLoad(
                discovery_pb2.GetLoadRequest(), timeout=self.timeout_s)
        except (OSError, grpc.RpcError):
            return None  # unreachable or not loaded yet: not picked
        return ReplicaLoad(address, load)


def serve(poller: LoadPoller, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            choice = pick(poller.loads) if self.path == "/pick" else None
            body = (choice or "no ready replica").encode()
            self.send_response(200 if choice else 503 if self.path == "/pick" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # one line per request would drown the replicas' logs

    return ThreadingHTTPServer(("0.0.0.0", port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", required=True,
                        help="comma-separated HOST:GRPC_PORT of the engine replicas")
    parser.add_argument("--port", type=int, default=9000, help="HTTP port (default: 9000)")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between load polls (default: 0.2)")
    parser.add_argument("--timeout", type=float, default=0.5,
                        help="deadline of each GetLoad call (default: 0.5)")
    args = parser.parse_args()
    poller = LoadPoller(args.replicas.split(","), args.interval, args.timeout)
    threading.Thread(target=poller.run, name="load-poller", daemon=True).start()
    serve(poller, args.port).serve_forever()


if __name__ == "__main__":
    main()
