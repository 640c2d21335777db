"""The routing examples stay consistent with the code: the docker compose file (two replicas,
the load picker, Envoy) passes real engine-serve flags and wires real ports and files, the
Envoy least-load config routes by the picker's answer, and the picker picks by GetLoad.
`docker compose config` validates the compose file where Docker Compose exists."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from example_scripts import LOAD_PICKER as PICKER
from example_scripts import load_picker
from protoserve.v1 import discovery_pb2

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "examples/compose/docker-compose.yaml"
ENVOY = ROOT / "examples/envoy/envoy-least-load.yaml"


def flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_compose_replicas_pass_real_flags_and_the_router_reaches_them() -> None:
    from protoserve.cli.serve import build_parser

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    replicas = {name: s for name, s in services.items() if name.startswith("replica-")}
    assert len(replicas) == 2
    for replica in replicas.values():
        parsed = build_parser().parse_args(replica["command"])
        assert parsed.grpc_port == 50051 and parsed.port == 8000
        assert [p.split(":")[1] for p in replica["ports"]] == ["8000"]
    # The picker polls exactly the replicas, on their gRPC port.
    picker = services["load-picker"]
    assert {r.split(":")[0] for r in flag_value(picker["command"], "--replicas").split(",")} \
        == set(replicas)
    assert {r.split(":")[1] for r in flag_value(picker["command"], "--replicas").split(",")} \
        == {"50051"}
    # Mounted files exist where the services expect them.
    (router_dir, _, _) = picker["volumes"][0].split(":")
    assert (COMPOSE.parent / router_dir / "load_picker.py").resolve() == PICKER
    assert picker["entrypoint"][-1] == "/router/load_picker.py"
    (envoy_file, target, _) = services["router"]["volumes"][0].split(":")
    assert (COMPOSE.parent / envoy_file).resolve() == ENVOY
    assert target == flag_value(services["router"]["command"], "-c")
    # Envoy asks the picker at the service name and port compose gives it.
    clusters = {c["name"]: c for c in yaml.safe_load(ENVOY.read_text())[
        "static_resources"]["clusters"]}
    address = clusters["load_picker"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["socket_address"]
    assert address["address"] == "load-picker"
    assert str(address["port_value"]) == flag_value(picker["command"], "--port")


def test_envoy_routes_to_the_host_the_picker_names() -> None:
    config = yaml.safe_load(ENVOY.read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    replicas = clusters["protoserve_replicas"]
    assert replicas["type"] == "ORIGINAL_DST" and replicas["lb_policy"] == "CLUSTER_PROVIDED"
    assert replicas["original_dst_lb_config"]["use_http_header"] is True
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    lua = hcm["typed_config"]["http_filters"][0]["typed_config"]
    source = lua["default_source_code"]["inline_string"]
    assert '"load_picker"' in source and '"/pick"' in source
    assert "x-envoy-original-dst-host" in source
    route = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["cluster"] == "protoserve_replicas"


def test_picker_flags_exist() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    help_text = subprocess.run([sys.executable, str(PICKER), "--help"], capture_output=True,
                               text=True, check=True, timeout=60, cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT)}).stdout
    for arg in services["load-picker"]["command"]:
        if arg.startswith("--"):
            assert arg in help_text


def test_picker_prefers_the_least_loaded_ready_replica() -> None:
    picker = load_picker()
    load = discovery_pb2.GetLoadResponse
    loads = [
        picker.ReplicaLoad("10.0.0.1:50051", load(num_requests_running=3, kv_cache_usage=0.1)),
        picker.ReplicaLoad("10.0.0.2:50051", load(num_requests_running=1,
                                                  num_requests_waiting=1, kv_cache_usage=0.5)),
        picker.ReplicaLoad("10.0.0.3:50051", load(num_requests_running=2, kv_cache_usage=0.2)),
        picker.ReplicaLoad("10.0.0.4:50051", load(draining=True)),
    ]
    assert picker.pick(loads) == "10.0.0.3:50051"  # load 2 twice: the emptier KV cache
    assert picker.pick(loads[3:]) is None  # draining only


def _compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_accepts_the_file() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("Docker Compose is not installed here (neither `docker compose` nor "
                    "`docker-compose`); CI runs this where it is")
    subprocess.run([*command, "-f", str(COMPOSE), "config", "--quiet"], check=True,
                   capture_output=True, timeout=120)
