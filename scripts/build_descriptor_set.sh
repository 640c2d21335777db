#!/usr/bin/env bash
# Build the protoserve.v1 descriptor set (with imports) that Envoy's gRPC-JSON transcoder loads:
#
#   scripts/build_descriptor_set.sh                       # -> examples/envoy/protoserve.pb
#   scripts/build_descriptor_set.sh /tmp/protoserve.pb
#
# Uses the pinned buf from `make lint-proto` (installed under .ci/node), else buf on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/examples/envoy/protoserve.pb}"
cd "$ROOT"
BUF=".ci/node/node_modules/.bin/buf"
if [[ ! -x "$BUF" ]]; then
    BUF="$(command -v buf || true)"
fi
if [[ -z "$BUF" ]]; then
    echo "buf not found: run 'make lint-proto' once (installs it via npm) or put buf on PATH" >&2
    exit 1
fi
# buf.yaml at the repo root names the `proto` module; the image includes every import
# (google/api/*.proto) as the transcoder requires.
"$BUF" build -o "$OUT" --as-file-descriptor-set
echo "wrote $OUT"
