"""Guided decoding through the real servers: the OpenAI SDK (extra_body guided_* fields and
response_format, completions and chat) and gRPC stubs, on a random-weight model at
temperature 1.0, with a KV cache small enough that concurrent requests get preempted."""
from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "structured"))
from engine_process import EngineProcess, start_engine  # noqa: E402
from guided_helpers import (  # noqa: E402
    CHOICES,
    CODE_REGEX,
    COMPACT_WHITESPACE,
    PERSON_SCHEMA,
    assert_full_match,
    assert_valid_json,
)

from protoserve.v1 import (  # noqa: E402
    common_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

SEEDS = range(20)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    # 48 blocks of 4 tokens: one request (prompt + 150 tokens) fits, twenty at once do not.
    handle = start_engine(tiny_llama_dir, "--block-size", "4", "--num-kv-blocks", "48",
                          role="all")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def channel(server: EngineProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield channel


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _in_parallel(fn, items) -> list:
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def _num_preemptions(channel: grpc.Channel) -> int:
    stub = discovery_pb2_grpc.DiscoveryStub(channel)
    return stub.GetLoad(discovery_pb2.GetLoadRequest()).num_preemptions


def test_sdk_extra_body_over_20_seeds_concurrently(client: openai.OpenAI, channel) -> None:
    model = _model(client)
    before = _num_preemptions(channel)
    guided = [
        {"guided_json": PERSON_SCHEMA, "guided_whitespace_pattern": COMPACT_WHITESPACE},
        {"guided_regex": CODE_REGEX},
        {"guided_choice": list(CHOICES)},
    ]

    def completion(args: tuple[int, int]) -> tuple[int, str, str]:
        kind, seed = args
        out = client.completions.create(model=model, prompt="Answer:", max_tokens=150,
                                        temperature=1.0, seed=seed, extra_body=guided[kind])
        return kind, out.choices[0].text, out.choices[0].finish_reason

    results = _in_parallel(completion, [(k, s) for k in range(3) for s in SEEDS])
    for kind, text, finish_reason in results:
        assert finish_reason == "stop", (kind, text)
        if kind == 0:
            assert_valid_json(text, PERSON_SCHEMA)
        elif kind == 1:
            assert_full_match(text, CODE_REGEX)
        else:
            assert text in CHOICES
    assert _num_preemptions(channel) > before  # the small KV cache forced recompute


def test_chat_response_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    model = _model(client)
    messages = [{"role": "user", "content": "Describe a person."}]
    for seed in range(5):
        out = client.chat.completions.create(
            model=model, messages=messages, max_tokens=150, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {
                "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
            extra_body={"guided_whitespace_pattern": COMPACT_WHITESPACE},
        )
        assert out.choices[0].finish_reason == "stop"
        assert_valid_json(out.choices[0].message.content, PERSON_SCHEMA)
    out = client.completions.create(
        model=model, prompt="JSON:", max_tokens=150, temperature=1.0, seed=3,
        extra_body={"response_format": {"type": "json_object"}, "guided_whitespace_pattern": ""},
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].text), dict)
    text_format = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0.0,
        response_format={"type": "text"})
    assert text_format.choices[0].finish_reason == "length"


def test_n_choices_and_streaming_each_match(client: openai.OpenAI) -> None:
    out = client.completions.create(model=_model(client), prompt="Code:", max_tokens=30, n=4,
                                    temperature=1.0, seed=7, extra_body={"guided_regex": CODE_REGEX})
    assert len(out.choices) == 4
    for choice in out.choices:
        assert_full_match(choice.text, CODE_REGEX)
    stream = client.chat.completions.create(
        model=_model(client), messages=[{"role": "user", "content": "Pick."}], stream=True,
        max_tokens=30, temperature=1.0, n=3, extra_body={"guided_choice": list(CHOICES)})
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(text in CHOICES for text in texts)


def test_stop_string_ends_a_guided_output_early(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=_model(client), prompt="Code:", max_tokens=30, temperature=1.0, seed=2,
        stop=["-"], extra_body={"guided_regex": CODE_REGEX})
    assert out.choices[0].finish_reason == "stop"
    assert_full_match(out.choices[0].text, r"[a-c]{2,5}")


@pytest.mark.parametrize(
    ("extra", "param", "reason"),
    [
        ({"guided_regex": "(abc"}, "guided_regex", "unclosed group"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "nope"}}, "guided_json", "nope"),
        ({"guided_grammar": "start: missing_rule"}, "guided_grammar", "missing_rule"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one kind"),
        ({"guided_regex": "a", "guided_decoding_backend": "nope"}, "guided_decoding_backend",
         "unknown"),
    ],
)
def test_bad_guided_inputs_are_400_naming_the_field(
    client: openai.OpenAI, extra: dict, param: str, reason: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model(client), prompt="x", max_tokens=5,
                                  extra_body=extra)
    error = info.value.body
    assert error["param"] == param and reason in error["message"], error


def _grpc_generate(channel, constraint: common_pb2.OutputConstraint, **sampling):
    request = inference_pb2.GenerateRequest(text="Answer:", constraint=constraint,
                                            sampling=common_pb2.SamplingParams(**sampling))
    return inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120)


def test_grpc_constraints_over_seeds(channel) -> None:
    schema = common_pb2.OutputConstraint(json_schema=json.dumps(PERSON_SCHEMA),
                                         whitespace_pattern="")
    choice = common_pb2.OutputConstraint(choice=common_pb2.OutputConstraint.Choice(
        choices=list(CHOICES)))
    for seed in range(10):
        for constraint, check in ((schema, lambda t: assert_valid_json(t, PERSON_SCHEMA)),
                                  (choice, lambda t: t in CHOICES or pytest.fail(t))):
            events = list(_grpc_generate(channel, constraint, temperature=1.0, seed=seed,
                                         max_tokens=150))
            text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
            (finished,) = [e.finished for e in events if e.WhichOneof("event") == "finished"]
            assert finished.reason == inference_pb2.FINISH_REASON_STOP
            check(text)


def test_grpc_bad_constraint_is_invalid_argument(channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(_grpc_generate(channel, common_pb2.OutputConstraint(regex="(abc"), max_tokens=5))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unclosed group" in info.value.details()


def test_slow_compile_does_not_stall_other_requests(channel) -> None:
    """While a large grammar compiles (about a second), a running request keeps receiving
    tokens: compilation is off the step thread. Counts tokens, asserts no timings."""
    stub = inference_pb2_grpc.InferenceStub(channel)
    runner = stub.Generate(inference_pb2.GenerateRequest(
        text="Go:", sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=300,
                                                       ignore_eos=True)), timeout=300)
    tokens = [0]
    first_token = threading.Event()

    def consume() -> None:
        for event in runner:
            if event.WhichOneof("event") == "delta":
                tokens[0] += len(event.delta.token_ids)
                first_token.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert first_token.wait(120)
    size = 25000  # wide, not deep: many alternatives, each a short literal
    lark = "start: " + " | ".join(f"r{i}" for i in range(size)) + "\n" + "\n".join(
        f'r{i}: "a{i}" "b{i % 97}"' for i in range(size))
    before = tokens[0]
    slow = stub.Generate(inference_pb2.GenerateRequest(
        text="x", constraint=common_pb2.OutputConstraint(grammar=lark),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4)), timeout=300)
    first = next(iter(slow))  # Started comes with the first token, i.e. after compiling
    during = tokens[0] - before
    rest = list(slow)
    thread.join()
    assert first.WhichOneof("event") == "started" and rest
    print(f"tokens of the running request while the grammar compiled: {during}")
    assert during >= 3, during


@pytest.mark.parametrize("backend", [None, "outlines", "lm-format-enforcer", "xgrammar", "auto",
                                     "guidance:disable-any-whitespace"])
def test_reference_backend_names_finish_valid_json(client: openai.OpenAI, backend) -> None:
    """Every name the reference server accepts is served; with no whitespace pattern, JSON
    whitespace is bounded, so even a random model at temperature 1 closes the object within a
    budget its longest output fits (the reference's flexible default can run to max_tokens)."""
    extra = {"guided_json": PERSON_SCHEMA}
    if backend is not None:
        extra["guided_decoding_backend"] = backend
    for seed in range(5):
        out = client.completions.create(model=_model(client), prompt="JSON:", max_tokens=400,
                                        temperature=1.0, seed=seed, extra_body=extra)
        text = out.choices[0].text
        assert out.choices[0].finish_reason == "stop", text
        assert_valid_json(text, PERSON_SCHEMA)
        if backend and "disable-any-whitespace" in backend:
            outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
            assert not re.search(r"\s", outside_strings), text


def test_unknown_backend_option_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model(client), prompt="x", max_tokens=5, extra_body={
            "guided_regex": "a", "guided_decoding_backend": "xgrammar:fast"})
    assert info.value.body["param"] == "guided_decoding_backend"
    assert "option" in info.value.body["message"]
