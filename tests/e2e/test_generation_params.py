"""Every generation parameter end to end: the real engine + bridge (`role="all"`), through the
OpenAI SDK and through gRPC stubs."""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
import pytest
from engine_process import EngineProcess
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from transformers import AutoTokenizer

from protoserve.v1 import common_pb2, inference_pb2

MAX_LOGPROBS = 5
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    # The same flags as test_generation_params_parity.py: the two modules share the server.
    return shared_server("--max-model-len", "256", "--max-logprobs", str(MAX_LOGPROBS),
                         role="all")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _generate(stub, **sampling) -> list[inference_pb2.GenerateResponse]:
    request = inference_pb2.GenerateRequest(
        text=PROMPT, sampling=common_pb2.SamplingParams(**sampling)
    )
    return list(stub.Generate(request, timeout=60))


def _tokens(events, index: int = 0) -> list[int]:
    return [t for e in events if e.HasField("delta") and e.delta.index == index
            for t in e.delta.token_ids]


def _greedy_tokens(stub, max_tokens: int = 6) -> list[int]:
    return _tokens(_generate(stub, temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def test_min_tokens_masks_stop_tokens_until_reached(stub) -> None:
    first = _greedy_tokens(stub)[0]
    events = _generate(stub, temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=[first])
    tokens = _tokens(events)
    assert first not in tokens[:3] and len(tokens) >= 3
    stopped = _generate(stub, temperature=0.0, max_tokens=8, stop_token_ids=[first])
    assert _tokens(stopped) == [first]
    assert [e.finished.stop_token_id for e in stopped if e.HasField("finished")] == [first]


def test_allowed_token_ids_limit_every_sample(stub, client) -> None:
    allowed = [40, 41, 42]
    events = _generate(stub, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True,
                       allowed_token_ids=allowed)
    assert len(_tokens(events)) == 10 and set(_tokens(events)) <= set(allowed)
    reply = client.completions.create(
        model="", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=4, logprobs=0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True,
                    "return_tokens_as_token_ids": True},
    )
    tokens = reply.choices[0].logprobs.tokens
    assert len(tokens) == 10 and {int(t.removeprefix("token_id:")) for t in tokens} <= set(allowed)


def test_bad_words_are_never_generated(stub, client, tokenizer) -> None:
    greedy = _greedy_tokens(stub)
    # A generated token that is a whole word on its own, with or without a leading space.
    word, token = next(
        (tokenizer.decode([t]), t) for t in greedy
        if tokenizer.decode([t]).strip()
        and t in (tokenizer.encode(tokenizer.decode([t]).strip(), add_special_tokens=False)
                  + tokenizer.encode(" " + tokenizer.decode([t]).strip(), add_special_tokens=False))
    )
    events = _generate(stub, temperature=0.0, max_tokens=6, ignore_eos=True, bad_words=[word])
    assert token not in _tokens(events)
    reply = client.completions.create(model="", prompt=PROMPT, max_tokens=6, temperature=0.0,
                                      extra_body={"bad_words": [word], "ignore_eos": True})
    assert reply.choices[0].text == tokenizer.decode(_tokens(events))


def test_logprobs_on_both_surfaces(stub, client) -> None:
    events = _generate(stub, temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    deltas = [e.delta for e in events if e.HasField("delta")]
    for delta in deltas:
        assert len(delta.logprobs) == len(delta.token_ids)
        for token_id, entry in zip(delta.token_ids, delta.logprobs):
            assert entry.chosen.token_id == token_id and entry.chosen.rank == 1
            assert [t.rank for t in entry.top] == [1, 2, 3]
            assert entry.top[0].token_id == token_id and entry.chosen.token
    reply = client.completions.create(model="", prompt=PROMPT, max_tokens=4, temperature=0.0,
                                      logprobs=3, extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    # Keyed by token text, so tokens that decode alike (partial UTF-8) share one key.
    assert len(logprobs.tokens) == 4
    assert all(token in top for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    chat = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0.0 for c in content)


def test_prompt_logprobs_and_echo(stub, client, tokenizer) -> None:
    events = _generate(stub, temperature=0.0, max_tokens=1, prompt_logprobs=2)
    started = events[0].started
    assert len(started.prompt_logprobs) == started.prompt_tokens
    assert not started.prompt_logprobs[0].HasField("chosen")
    assert all(len(e.top) == 2 for e in started.prompt_logprobs[1:])
    assert started.cached_tokens == 0
    reply = client.completions.create(model="", prompt=PROMPT, max_tokens=2, temperature=0.0,
                                      echo=True, logprobs=1, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    num_prompt = len(tokenizer.encode(PROMPT))
    assert choice.text.startswith(PROMPT)
    assert len(choice.logprobs.tokens) == num_prompt + 2
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v <= 0.0 for v in choice.logprobs.token_logprobs[1:])


def test_n4_seeded_samples_are_reproducible_and_different(client) -> None:
    def run() -> list[str]:
        reply = client.completions.create(model="", prompt=PROMPT, n=4, seed=123, max_tokens=8,
                                          temperature=1.0, extra_body={"ignore_eos": True})
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = run()
    assert len(first) == 4 and run() == first
    assert len(set(first)) > 1


def test_best_of_returns_the_candidate_with_the_best_cumulative_logprob(stub, client) -> None:
    common = dict(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True, logprobs=0)
    all_four = _generate(stub, n=4, **common)
    scores = {
        i: sum(entry.chosen.logprob for e in all_four if e.HasField("delta") and e.delta.index == i
               for entry in e.delta.logprobs)
        for i in range(4)
    }
    best = max(scores, key=scores.get)
    picked = _generate(stub, n=1, best_of=4, **common)
    assert _tokens(picked) == _tokens(all_four, best)
    assert [e.finished.index for e in picked if e.HasField("finished")] == [0]
    reply = client.completions.create(model="", prompt=PROMPT, n=2, best_of=4, seed=11,
                                      max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]


def test_truncate_prompt_tokens_keeps_the_last_tokens(stub) -> None:
    events = _generate(stub, temperature=0.0, max_tokens=1, truncate_prompt_tokens=2)
    assert events[0].started.prompt_tokens == 2


BAD_VALUES = [
    ("n", {"n": 2, "temperature": 0.0}, {"n": 2, "temperature": 0.0}),
    ("best_of", {"n": 3, "best_of": 2}, {"n": 3, "best_of": 2}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 2}, {"min_tokens": 5, "max_tokens": 2}),
    ("logprobs", {"logprobs": MAX_LOGPROBS + 1}, {"logprobs": MAX_LOGPROBS + 1}),
    ("prompt_logprobs", {"prompt_logprobs": MAX_LOGPROBS + 1},
     {"prompt_logprobs": MAX_LOGPROBS + 1}),
    ("stop", {"stop": [""]}, {"stop": [""]}),
    ("logit_bias", {"logit_bias": {"100000": 1.0}}, {"logit_bias": {100000: 1.0}}),
    ("allowed_token_ids", {"allowed_token_ids": [100000]}, {"allowed_token_ids": [100000]}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": 0}),
    # Beam search ranks by the model's log-probabilities: a temperature is refused, by name.
    ("temperature", {"use_beam_search": True, "temperature": 0.5},
     {"use_beam_search": True, "temperature": 0.5}),
]


@pytest.mark.parametrize(("field", "rest", "grpc_sampling"), BAD_VALUES,
                         ids=[b[0] for b in BAD_VALUES])
def test_bad_values_name_the_field(stub, client, field: str, rest: dict, grpc_sampling: dict) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="", prompt=PROMPT, max_tokens=2, extra_body=rest)
    assert caught.value.param == field
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, **grpc_sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field_of(info.value) == field


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("best_of", {"stream": True, "best_of": 2}),
        ("stream_options", {"stream_options": {"include_usage": True}}),
        ("seed", {"seed": 2**63}),
        ("suffix", {"suffix": "tail"}),
    ],
)
def test_bridge_rejects_before_the_engine(server: EngineProcess, field: str, body: dict) -> None:
    import httpx

    reply = httpx.post(f"{server.http_url}/v1/completions",
                       json={"prompt": PROMPT, "max_tokens": 2, **body}, timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == field or field in error["message"]


def test_stream_continuous_usage_and_stop_reason(client) -> None:
    chunks = list(client.completions.create(
        model="", prompt=PROMPT, max_tokens=3, temperature=0.0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    ))
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == 3 and not chunks[-1].choices
    assert math.isfinite(chunks[-1].usage.prompt_tokens)


def _field_of(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request.field_violations[0].field
    return None


def test_echo_of_a_token_id_prompt_keeps_its_special_tokens(client, tokenizer) -> None:
    """As the reference server echoes it: every token sent, special ones included."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode("Once upon", add_special_tokens=False),
           tokenizer.eos_token_id]
    reply = client.completions.create(model="", prompt=ids, max_tokens=2, temperature=0.0,
                                      echo=True, extra_body={"ignore_eos": True})
    expected = tokenizer.decode(ids, skip_special_tokens=False)
    assert tokenizer.bos_token in expected and tokenizer.eos_token in expected
    assert reply.choices[0].text.startswith(expected)
