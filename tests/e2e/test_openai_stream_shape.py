"""Shapes a client of the reference server relies on, through the real engine + bridge
(`role="all"`), the OpenAI SDK and raw HTTP: the last content chunk of a stream carries the
finish_reason (the engine marks that delta `last` on gRPC), `logprobs=0` lists the chosen token
in `top_logprobs`, and `usage.prompt_tokens_details` comes only with
`--enable-prompt-tokens-details`."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from engine_process import REPO_ROOT, START_TIMEOUT_S, EngineProcess, free_port, starts_servers
from served_engine import wait_for_health

from protoserve.v1 import common_pb2, inference_pb2
from rest_bridge.sse import parse_sse_events

MAX_LOGPROBS = 5
PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "hi"}]
# Sampled (not greedy) so that the choices of n=2 differ; the seed keeps runs repeatable.
SAMPLED = dict(temperature=1.0, seed=7, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    # test_generation_params.py's flags: the modules share one server.
    return shared_server("--max-model-len", "256", "--max-logprobs", str(MAX_LOGPROBS),
                         role="all")


@pytest.fixture(scope="module")
@starts_servers
def details_url(server: EngineProcess) -> Iterator[str]:
    """A second bridge in front of the same engine, with --enable-prompt-tokens-details
    (a bridge process is cheap; the engine is not started twice)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rest_bridge", "--engine-address", server.grpc_address,
         "--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning",
         "--enable-prompt-tokens-details"],
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, START_TIMEOUT_S)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# ----- the finish on the last delta (gRPC) --------------------------------------------------------

def _generate(stub, **sampling: Any) -> list[inference_pb2.GenerateResponse]:
    request = inference_pb2.GenerateRequest(text=PROMPT,
                                            sampling=common_pb2.SamplingParams(**sampling))
    return list(stub.Generate(request, timeout=60))


def _assert_last_deltas_lead_to_their_finish(events: list[inference_pb2.GenerateResponse],
                                             choices: int) -> None:
    for index in range(choices):
        deltas = [i for i, e in enumerate(events) if e.HasField("delta")
                  and e.delta.index == index]
        assert [events[i].delta.last for i in deltas] == [False] * (len(deltas) - 1) + [True]
        follower = events[deltas[-1] + 1]
        assert follower.HasField("finished") and follower.finished.index == index


def test_the_engine_marks_the_delta_that_ends_each_choice(stub) -> None:
    events = _generate(stub, n=2, max_tokens=5, temperature=1.0, seed=3, ignore_eos=True)
    _assert_last_deltas_lead_to_their_finish(events, choices=2)
    # Ended by a stop token: the delta with that token is the last.
    first = _generate(stub, max_tokens=1, temperature=0.0)[1].delta.token_ids[0]
    stopped = _generate(stub, max_tokens=8, temperature=0.0, stop_token_ids=[first])
    _assert_last_deltas_lead_to_their_finish(stopped, choices=1)
    assert stopped[-2].finished.reason == inference_pb2.FINISH_REASON_STOP


# ----- streamed chunks ----------------------------------------------------------------------------

def test_streamed_completion_chunks_each_carry_tokens_the_last_the_finish(client) -> None:
    common = dict(model="", prompt=PROMPT, n=2, max_tokens=6, logprobs=1, **SAMPLED)
    plain = client.completions.create(**common)
    chunks = list(client.completions.create(
        **common, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    *choice_chunks, usage_chunk = chunks
    by_index: dict[int, list[Any]] = {}
    for chunk in choice_chunks:
        (choice,) = chunk.choices
        by_index.setdefault(choice.index, []).append(choice)
        # Every chunk carries tokens: no empty finish chunk after the last one.
        assert choice.logprobs.tokens
    for reply in plain.choices:
        streamed = by_index[reply.index]
        assert [c.finish_reason for c in streamed] == [None] * (len(streamed) - 1) + ["length"]
        assert "".join(c.text for c in streamed) == reply.text
        assert sum((c.logprobs.tokens for c in streamed), []) == reply.logprobs.tokens
    # Cumulative usage grows with every chunk: none repeats the count of the one before.
    counts = [chunk.usage.completion_tokens for chunk in choice_chunks]
    assert all(a < b for a, b in zip(counts, counts[1:])) and counts[-1] == 12
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12


def test_streamed_chat_is_a_role_chunk_then_content_the_last_with_the_finish(client) -> None:
    chunks = list(client.chat.completions.create(
        model="", messages=CHAT, max_tokens=5, logprobs=True, stream=True, **SAMPLED))
    role, *content = chunks
    assert role.choices[0].delta.role == "assistant" and role.choices[0].finish_reason is None
    # Every chunk carries tokens (its logprobs say which), the last one the finish.
    counts = [len(c.choices[0].logprobs.content) for c in content]
    assert all(counts) and sum(counts) == 5
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + [
        "length"]


# ----- logprobs=0 ---------------------------------------------------------------------------------

def _assert_chosen_only(logprobs: Any, first_is_none: bool = False) -> None:
    tops, tokens, values = logprobs.top_logprobs, logprobs.tokens, logprobs.token_logprobs
    if first_is_none:
        # Nothing predicts the first prompt token.
        assert tops[0] is None and values[0] is None
        tops, tokens, values = tops[1:], tokens[1:], values[1:]
    assert tops == [{token: value} for token, value in zip(tokens, values)]


def test_logprobs_zero_lists_the_chosen_token_also_with_echo(client) -> None:
    common = dict(model="", prompt=PROMPT, max_tokens=3, logprobs=0, **SAMPLED)
    _assert_chosen_only(client.completions.create(**common).choices[0].logprobs)
    echoed = client.completions.create(**common, echo=True).choices[0]
    assert echoed.text.startswith(PROMPT)
    _assert_chosen_only(echoed.logprobs, first_is_none=True)
    # Streamed: the chunks' lists concatenate to the same.
    tops: list[Any] = []
    for chunk in client.completions.create(**common, echo=True, stream=True):
        tops += chunk.choices[0].logprobs.top_logprobs
    assert tops == echoed.logprobs.top_logprobs
    # logprobs=N: the chosen token first, then the top N (N + 1 entries when it is not among
    # them), as on the reference server.
    two = client.completions.create(**{**common, "logprobs": 2}).choices[0].logprobs
    for token, top in zip(two.tokens, two.top_logprobs):
        assert next(iter(top)) == token and len(top) <= 3


# ----- prompt_tokens_details ---------------------------------------------------------------------

def test_prompt_tokens_details_only_with_the_flag(server: EngineProcess,
                                                  details_url: str) -> None:
    # Long enough to fill prefix-cache blocks, so that a repeat finds cached tokens.
    prompt = " ".join(["a river ran by the old mill and"] * 8)
    body = {"model": "", "prompt": prompt, "max_tokens": 2}
    plain = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    usage = plain.json()["usage"]
    # Without the flag: null in a plain body (as the reference's), absent from streamed usage.
    assert usage["prompt_tokens_details"] is None
    streamed = httpx.post(f"{server.http_url}/v1/completions", timeout=60, json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    assert "prompt_tokens_details" not in parse_sse_events(streamed.content)[-2]["usage"]
    client = openai.OpenAI(base_url=f"{details_url}/v1", api_key="unused", max_retries=0)
    again = client.completions.create(**body).usage
    assert 0 < again.prompt_tokens_details.cached_tokens <= again.prompt_tokens
    chat = client.chat.completions.create(model="", messages=CHAT, max_tokens=2,
                                          stream=True, stream_options={"include_usage": True})
    final = list(chat)[-1].usage
    assert final.prompt_tokens_details is not None
    assert 0 <= final.prompt_tokens_details.cached_tokens <= final.prompt_tokens
