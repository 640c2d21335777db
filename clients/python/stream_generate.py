#!/usr/bin/env python3
"""Stream one generation from a protoserve engine over gRPC and print it as it arrives.

    python clients/python/stream_generate.py --prompt "Once upon a time" --max-tokens 32
    python clients/python/stream_generate.py --chat --prompt "Say hello"

Needs only grpcio + protobuf + googleapis-common-protos and the generated `protoserve.v1`
stubs (run from the repo root, or with the project installed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

# Running the file directly from a checkout: make the repo's stubs importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402


def build_request(prompt: str, max_tokens: int, chat: bool) -> inference_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens)
    if chat:
        # The engine renders its own chat template, so every client gets the same prompt.
        message = common_pb2.ChatMessage(role="user", text=prompt)
        return inference_pb2.GenerateRequest(
            chat=common_pb2.ChatInput(messages=[message]), sampling=sampling
        )
    return inference_pb2.GenerateRequest(text=prompt, sampling=sampling)


def stream(address: str, request: inference_pb2.GenerateRequest, timeout: float) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        try:
            for response in stub.Generate(request, timeout=timeout):
                event = response.WhichOneof("event")
                if event == "started":
                    started = response.started
                    print(f"[{started.request_id}: {started.prompt_tokens} prompt tokens]")
                elif event == "delta":
                    print(response.delta.text, end="", flush=True)
                elif event == "finished":
                    finished = response.finished
                    reason = inference_pb2.FinishReason.Name(finished.reason)
                    print(f"\n[finish: {reason}, {finished.completion_tokens} tokens]")
                elif event == "usage":
                    usage = response.usage
                    print(
                        f"[usage: prompt={usage.prompt_tokens} "
                        f"completion={usage.completion_tokens} cached={usage.cached_tokens}]"
                    )
        except grpc.RpcError as error:
            # Errors end the stream with a status code, never an in-band event.
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="engine gRPC address")
    parser.add_argument("--prompt", default="Once upon a time", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    args = parser.parse_args()
    request = build_request(args.prompt, args.max_tokens, args.chat)
    return stream(args.address, request, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
