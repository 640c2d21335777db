"""The deployment files stay consistent with the code: Dockerfile targets, the Kubernetes
probes and drain hook, the Envoy transcoder's services and descriptor set, the Go example."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

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
