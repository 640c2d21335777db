"""The deployment files stay consistent with the code: Dockerfile targets, the Kubernetes
probes and drain hook, the metric names the autoscaling and routing examples read, the Envoy
transcoder's services and descriptor set, the Go example."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from google.protobuf import descriptor_pb2

from protoserve.v1 import admin_pb2, discovery_pb2, inference_pb2, tokenizer_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_has_engine_bridge_and_cpu_targets() -> None:
    targets = re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert {"engine", "bridge", "cpu"} <= set(targets)


def test_k8s_deployment_probes_socket_and_drain() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples/k8s/deployment.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    engine, bridge = (c for c in pod["containers"])
    assert engine["readinessProbe"]["grpc"]["service"] == "protoserve.v1.Inference"
    assert engine["livenessProbe"]["grpc"]["service"] == ""
    assert "Drain" in engine["lifecycle"]["preStop"]["exec"]["command"][-1]
    socket_arg = next(a for a in engine["args"] if a.startswith("--grpc-uds="))
    assert f"unix://{socket_arg.split('=', 1)[1]}" in " ".join(bridge["args"])
    assert {v["name"] for v in pod["volumes"]} >= {"sockets"}
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/health"
    # Every flag the example passes exists.
    from protoserve.cli.serve import build_parser

    build_parser().parse_args([a for a in engine["args"]])


def _metric_names_in(manifest: str) -> set[str]:
    """Every vllm: metric name a manifest's values mention (queries, flags)."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            names.update(re.findall(r"\bvllm:[A-Za-z_][A-Za-z0-9_:]*", node))

    for doc in yaml.safe_load_all((ROOT / "examples/k8s" / manifest).read_text()):
        walk(doc)
    return names


def _exported_names(text: bytes) -> set[str]:
    """Family names (# TYPE lines) and sample names of a Prometheus text page."""
    names = set(re.findall(r"^# TYPE (\S+)", text.decode(), re.M))
    return names | set(re.findall(r"^([^#\s{]+)", text.decode(), re.M))


def _engine_exports() -> set[str]:
    """The engine's --metrics-port page with --metrics-compat, from the collector engine-serve
    builds (make_engine_metrics), over a loaded engine's numbers."""
    from engine.config import CacheConfig
    from engine.core.loop import CoreStats
    from engine.server.context import EngineHandle
    from engine.server.lifecycle import make_engine_metrics
    from protoserve.serving_metrics import RequestRecord

    engine = SimpleNamespace(
        loop=SimpleNamespace(stats=lambda: CoreStats(num_kv_blocks=64, num_free_kv_blocks=64),
                             is_alive=True, num_streams=0),
        model=SimpleNamespace(names=("m",), block_size=16, num_blocks=64),
        config=SimpleNamespace(cache=CacheConfig()))
    metrics = make_engine_metrics(EngineHandle(engine=engine), compat=True)
    metrics.record(RequestRecord("stop", 3, 2, 1.0, 0.1, n=1))
    return _exported_names(metrics.render())


def _bridge_exports() -> set[str]:
    """The bridge's /metrics with --metrics-compat, once it has reached its engine."""
    from rest_bridge.metrics import BridgeMetrics

    bridge = BridgeMetrics(compat=True)
    bridge.describe_model(discovery_pb2.ModelInfo(id="m", block_size=16, num_kv_blocks=64))
    return _exported_names(bridge.render(discovery_pb2.GetLoadResponse()))


def test_k8s_autoscaling_and_routing_read_metrics_the_servers_export() -> None:
    """KEDA queries Prometheus, which scrapes the engine's metrics port; the endpoint picker
    scrapes the serving port (the bridge). Every name they read is one the server exports."""
    keda = _metric_names_in("keda-scaledobject.yaml")
    picker = _metric_names_in("inference-pool.yaml")
    assert "vllm:num_requests_waiting" in keda
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info",
            "vllm:cache_config_info"} <= picker
    assert keda <= _engine_exports(), keda - _engine_exports()
    assert picker <= _bridge_exports(), picker - _bridge_exports()
    # Both processes of the example Deployment export vLLM's names.
    pod = next(yaml.safe_load_all((ROOT / "examples/k8s/deployment.yaml").read_text()))
    for container in pod["spec"]["template"]["spec"]["containers"]:
        assert "--metrics-compat" in container["args"], container["name"]
    pool = next(d for d in yaml.safe_load_all(
        (ROOT / "examples/k8s/inference-pool.yaml").read_text()) if d["kind"] == "InferencePool")
    bridge_port = next(c for c in pod["spec"]["template"]["spec"]["containers"]
                       if c["name"] == "bridge")["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": bridge_port}]
    assert pool["spec"]["selector"]["matchLabels"] == pod["spec"]["selector"]["matchLabels"]


def test_envoy_transcodes_real_services_with_least_request() -> None:
    config = yaml.safe_load((ROOT / "examples/envoy/envoy.yaml").read_text())
    cluster = config["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    transcoder = hcm["typed_config"]["http_filters"][0]["typed_config"]
    known = {m.DESCRIPTOR.services_by_name[n].full_name for m, n in (
        (inference_pb2, "Inference"), (discovery_pb2, "Discovery"), (tokenizer_pb2, "Tokenizer"),
        (admin_pb2, "Admin"))}
    assert set(transcoder["services"]) <= known


def test_descriptor_set_builds_with_buf(tmp_path: Path) -> None:
    if not (ROOT / ".ci/node/node_modules/.bin/buf").exists() and shutil.which("buf") is None:
        pytest.skip("buf not installed (make lint-proto installs it)")
    out = tmp_path / "protoserve.pb"
    subprocess.run([str(ROOT / "scripts/build_descriptor_set.sh"), str(out)], check=True,
                   capture_output=True, timeout=120)
    files = {f.name for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert {"protoserve/v1/inference.proto", "google/api/annotations.proto"} <= files


def test_go_example_compiles_where_go_exists(tmp_path: Path) -> None:
    if shutil.which("go") is None or shutil.which("protoc-gen-go") is None:
        pytest.skip("Go toolchain with protoc-gen-go/protoc-gen-go-grpc not installed")
    go_dir = ROOT / "clients/go"
    subprocess.run(["buf", "generate"], cwd=go_dir, check=True, timeout=300)
    subprocess.run(["go", "vet", "./..."], cwd=go_dir, check=True, timeout=600)
