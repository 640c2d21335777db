#!/usr/bin/env python3
"""Regenerate the Python stubs of proto/protoserve/v1 into protoserve/v1/ (committed).

    make protos                       # regenerate (grpcio-tools at the version pyproject pins)
    make check                        # fail when the committed stubs are stale (CI)

The check compares the generated code, not the version stamps grpcio-tools writes into it
(`GRPC_GENERATED_VERSION`, the protobuf gencode version): another tools release must not make
a clean clone fail. The stamps still matter at run time, since stubs refuse to import under an
older grpcio or protobuf, so the check also holds pyproject.toml's floors for grpcio and
protobuf at or above the committed stamps. google/api/*_pb2 come from googleapis-common-protos.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import tomllib
from pathlib import Path

from grpc_tools import protoc
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path("protoserve") / "v1"
REGENERATE_HINT = "run: make protos"

_GRPC_STAMP = re.compile(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)
_PROTOBUF_STAMP = re.compile(r"^# Protobuf Python Version: ([0-9.]+)$", re.M)
_PROTOBUF_CHECK = re.compile(r"ValidateProtobufRuntimeVersion\(.*?\n\)", re.S)


def generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_DIR / PACKAGE_DIR).glob("*.proto"))
    include_wkt = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include_wkt}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in (out_dir / PACKAGE_DIR).glob("*_pb2*.py*"))


def without_stamps(text: str) -> str:
    """The generated code with the tools' version stamps blanked out."""
    text = _GRPC_STAMP.sub("GRPC_GENERATED_VERSION = <stamp>", text)
    text = _PROTOBUF_STAMP.sub("# Protobuf Python Version: <stamp>", text)
    return _PROTOBUF_CHECK.sub("ValidateProtobufRuntimeVersion(<stamp>)", text)


def stamps(stub_dir: Path) -> dict[str, Version]:
    """The highest grpcio and protobuf versions the stubs in `stub_dir` were stamped with."""
    found: dict[str, Version] = {}
    for path in stub_dir.glob("*_pb2*.py"):
        text = path.read_text()
        for package, pattern in (("grpcio", _GRPC_STAMP), ("protobuf", _PROTOBUF_STAMP)):
            for match in pattern.finditer(text):
                found[package] = max(found.get(package, Version("0")), Version(match[1]))
    return found


def floor_problems(stub_dir: Path) -> list[str]:
    """pyproject.toml dependencies whose lower bound admits a runtime the stubs reject."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements = {r.name: r for r in map(Requirement, dependencies)}
    problems = []
    for package, stamp in sorted(stamps(stub_dir).items()):
        requirement = requirements.get(package)
        floors = [Version(s.version) for s in requirement.specifier
                  if s.operator in (">=", "==", "~=")] if requirement else []
        if not floors or max(floors) < stamp:
            problems.append(f"pyproject.toml: the stubs need {package}>={stamp}, "
                            f"but the dependency is {requirement or 'missing'}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generated = generate(tmp_dir)
        stale = []
        for rel in generated:
            target = ROOT / rel
            fresh = (tmp_dir / rel).read_text()
            if not target.exists() or without_stamps(target.read_text()) != without_stamps(fresh):
                stale.append(str(rel))
                if not args.check:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(fresh)
        existing = {p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).glob("*_pb2*.py*")}
        orphans = sorted(str(p) for p in existing - set(generated))
    if not args.check:
        for orphan in orphans:
            (ROOT / orphan).unlink()
        print(f"wrote {len(stale)} of {len(generated)} stubs", *stale, sep="\n  ")
    problems = floor_problems(ROOT / PACKAGE_DIR)
    if args.check and (stale or orphans):
        print("stale generated stubs:", *stale, *orphans, sep="\n  ")
        print(REGENERATE_HINT)
        return 1
    if problems:
        print(*problems, sep="\n")
        return 1
    if args.check:
        print(f"{len(generated)} generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
