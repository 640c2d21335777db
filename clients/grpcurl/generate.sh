#!/usr/bin/env bash
# The engine's gRPC API from the shell, through server reflection (no .proto files needed).
#
#   clients/grpcurl/generate.sh [ADDRESS] [PROMPT]      default 127.0.0.1:50051
#
# Needs grpcurl: https://github.com/fullstorydev/grpcurl
set -euo pipefail

ADDR="${1:-127.0.0.1:50051}"
PROMPT="${2:-Once upon a time}"
# Build the JSON with python so quotes in the prompt cannot break it.
BODY="$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1], "sampling": {"max_tokens": 16}}))' "$PROMPT")"

echo "# liveness (empty service name) and readiness (model loaded: protoserve.v1.Inference)"
grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check
grpcurl -plaintext -d '{"service": "protoserve.v1.Inference"}' "$ADDR" grpc.health.v1.Health/Check

echo "# services and the shape of a request"
grpcurl -plaintext "$ADDR" list
grpcurl -plaintext "$ADDR" describe protoserve.v1.Inference
grpcurl -plaintext "$ADDR" describe protoserve.v1.GenerateRequest

echo "# served models"
grpcurl -plaintext "$ADDR" protoserve.v1.Discovery/ListModels

echo "# a streamed generation: one JSON object per event (started, deltas, finished, usage)"
grpcurl -plaintext -d "$BODY" "$ADDR" protoserve.v1.Inference/Generate

echo "# the same with a chat prompt, rendered by the engine's chat template"
grpcurl -plaintext -d '{"chat": {"messages": [{"role": "user", "text": "Say hello"}]}, "sampling": {"max_tokens": 16}}' \
    "$ADDR" protoserve.v1.Inference/Generate
