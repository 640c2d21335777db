"""The development environment a fresh clone gets: the lock covers every dependency, the venv
holds what the lock says, and the stub check compares code, not the tools' version stamps."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = {**default_environment(), "extra": "test"}
    requirements = [Requirement(r) for r in
                    (*project["dependencies"], *project["optional-dependencies"]["test"])]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(environment)]


def test_lock_pins_every_declared_dependency() -> None:
    pins = _pins()
    missing = [str(r) for r in _declared_requirements()
               if canonicalize_name(r.name) not in pins and r.name != "torch"]
    assert not missing, f"not in constraints.txt (run make lock): {missing}"
    # A pin the declared range rejects would make bootstrap fail to resolve.
    rejected = [f"{r} vs =={pins[canonicalize_name(r.name)]}" for r in _declared_requirements()
                if canonicalize_name(r.name) in pins
                and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert not rejected, f"constraints.txt pins outside pyproject's ranges: {rejected}"


def test_venv_holds_the_locked_versions() -> None:
    drift = []
    for name, version in _pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a platform-conditional dependency this machine does not use
        if installed != version:
            drift.append(f"{name} {installed} (locked {version})")
    assert not drift, f"the venv differs from constraints.txt (run scripts/bootstrap): {drift}"


def test_stub_check_ignores_version_stamps_only() -> None:
    gen = _load_gen_protos()
    stub = (ROOT / "protoserve/v1/common_pb2.py").read_text()
    grpc_stub = (ROOT / "protoserve/v1/inference_pb2_grpc.py").read_text()
    assert gen._PROTOBUF_STAMP.search(stub) and gen._PROTOBUF_CHECK.search(stub)
    assert gen._GRPC_STAMP.search(grpc_stub)
    # Another grpcio-tools release: only the stamps move.
    restamped = re.sub(r"(Protobuf Python Version: )[0-9.]+", r"\g<1>9.1.2", stub)
    restamped = re.sub(r"(Domain\.PUBLIC,\n\s*)\d+,\n\s*\d+,\n\s*\d+,",
                       r"\g<1>9,\n    1,\n    2,", restamped)
    assert restamped != stub
    assert gen.without_stamps(restamped) == gen.without_stamps(stub)
    regrpc = grpc_stub.replace(gen._GRPC_STAMP.search(grpc_stub)[1], "9.9.9")
    assert gen.without_stamps(regrpc) == gen.without_stamps(grpc_stub)
    # A change to the contract itself still shows.
    changed = grpc_stub.replace("/protoserve.v1.Inference/Generate", "/protoserve.v1.Inference/Gen")
    assert changed != grpc_stub
    assert gen.without_stamps(changed) != gen.without_stamps(grpc_stub)


def test_dependency_floors_cover_the_stub_stamps(tmp_path: Path) -> None:
    gen = _load_gen_protos()
    assert gen.floor_problems(ROOT / "protoserve" / "v1") == []
    # Stubs stamped by a newer grpcio-tools than the floor allows are caught.
    text = (ROOT / "protoserve/v1/admin_pb2_grpc.py").read_text()
    (tmp_path / "admin_pb2_grpc.py").write_text(
        gen._GRPC_STAMP.sub("GRPC_GENERATED_VERSION = '99.0.0'", text))
    problems = gen.floor_problems(tmp_path)
    assert len(problems) == 1 and "grpcio>=99.0.0" in problems[0]


def test_stub_generator_is_pinned_exactly() -> None:
    # Each release stamps its own version into the stubs; a range would let it drift.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [Requirement(r).specifier for r in project["optional-dependencies"]["test"]
             if canonicalize_name(Requirement(r).name) == "grpcio-tools"]
    assert len(specs) == 1 and [s.operator for s in specs[0]] == ["=="]
