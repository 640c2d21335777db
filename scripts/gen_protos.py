#!/usr/bin/env python3
"""Regenerate the Python stubs of proto/protoserve/v1 into protoserve/v1/ (committed).

One command for every stub: `python scripts/gen_protos.py`. CI runs it and fails when the
committed stubs differ (`--check`). google/api/*_pb2 come from googleapis-common-protos.
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PACKAGE_DIR = Path("protoserve") / "v1"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        generated = generate(tmp_dir)
        stale = []
        for rel in generated:
            target = ROOT / rel
            if not target.exists() or not filecmp.cmp(tmp_dir / rel, target, shallow=False):
                stale.append(str(rel))
                if not args.check:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes((tmp_dir / rel).read_bytes())
        existing = {p.relative_to(ROOT) for p in (ROOT / PACKAGE_DIR).glob("*_pb2*.py*")}
        orphans = sorted(str(p) for p in existing - set(generated))
    if args.check:
        if stale or orphans:
            print("stale generated stubs:", *stale, *orphans, sep="\n  ")
            print("run: python scripts/gen_protos.py")
            return 1
        print(f"{len(generated)} generated stubs are up to date")
        return 0
    for orphan in orphans:
        (ROOT / orphan).unlink()
    print(f"wrote {len(stale)} of {len(generated)} stubs", *stale, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
