#!/usr/bin/env python3
"""A streamed chat completion through protoserve's OpenAI bridge with the official OpenAI SDK.

    python clients/openai/chat_example.py [--base-url http://127.0.0.1:8000/v1] [--prompt "..."]
"""
from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    # The bridge checks the key only when it was started with one.
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--prompt", default="Write a haiku about paged memory.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    # The engine serves named models; take the first instead of hard-coding one.
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            print(choice.delta.content or "", end="", flush=True)
            if choice.finish_reason is not None:
                print(f"\n[finish: {choice.finish_reason}]")
        if chunk.usage is not None:
            print(f"[usage: {chunk.usage.prompt_tokens} prompt, "
                  f"{chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
