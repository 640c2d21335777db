"""Beam search through the real servers (`role="all"`): the OpenAI SDK (`use_beam_search` and
`best_of` in extra_body) and gRPC stubs return the same beams as transformers'
`generate(num_beams=4, do_sample=False, early_stopping=False)` on a tiny float32 Llama.

The server runs with --max-logprobs 1: width 4 ranks the top 8 tokens per beam and step, which
that client-facing limit must not bound; a client's own logprobs above it are still refused."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import torch
from engine_process import EngineProcess, start_engine
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from model_factory import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from protoserve.v1 import common_pb2, inference_pb2

PROMPT = "the quick brown fox"
WIDTH = 4
MAX_TOKENS = 10
# Far below the 2 * WIDTH tokens a beam search step ranks.
MAX_LOGPROBS = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp("beam-served"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        # Peaked logits keep beams far from ties; a wide EOS spread lets some beams end on it.
        model.lm_head.weight.normal_(0.0, 0.5)
        model.lm_head.weight[eos] *= 3.0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[EngineProcess]:
    handle = start_engine(model_dir, "--max-model-len", "256", "--block-size", "4",
                          "--max-logprobs", str(MAX_LOGPROBS), role="all")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _expected(reference, n: int, length_penalty: float) -> list[list[int]]:
    model, tokenizer = reference
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=WIDTH, do_sample=False,
            num_return_sequences=n, length_penalty=length_penalty, early_stopping=False,
            max_new_tokens=MAX_TOKENS, eos_token_id=eos, pad_token_id=eos,
        )
    rows = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _grpc_beams(stub, **sampling) -> list[inference_pb2.GenerateResponse]:
    request = inference_pb2.GenerateRequest(
        text=PROMPT, return_prompt_token_ids=True,
        sampling=common_pb2.SamplingParams(use_beam_search=True, max_tokens=MAX_TOKENS, **sampling),
    )
    return list(stub.Generate(request, timeout=120))


@pytest.mark.parametrize("length_penalty", [1.0, -0.5])
def test_grpc_returns_the_top_beams_of_transformers(stub, reference, length_penalty) -> None:
    # n=3: with this model the top beams end on EOS, the third at max_tokens for lp=1.0.
    events = _grpc_beams(stub, best_of=WIDTH, n=3, length_penalty=length_penalty)
    _, tokenizer = reference
    assert list(events[0].started.prompt_token_ids) == tokenizer.encode(PROMPT)
    expected = _expected(reference, 3, length_penalty)
    deltas = [e.delta for e in events if e.HasField("delta")]
    finished = [e.finished for e in events if e.HasField("finished")]
    assert [d.index for d in deltas] == [0, 1, 2] and [f.index for f in finished] == [0, 1, 2]
    assert [list(d.token_ids) for d in deltas] == expected
    eos = tokenizer.eos_token_id
    for beam, done in zip(expected, finished):
        reason = inference_pb2.FINISH_REASON_STOP if beam[-1] == eos else inference_pb2.FINISH_REASON_LENGTH
        assert done.reason == reason and done.completion_tokens == len(beam)
    assert events[-1].usage.completion_tokens == sum(len(b) for b in expected)


def test_openai_sdk_returns_the_top_beams_as_choices(client, reference) -> None:
    expected = _expected(reference, 2, 1.0)
    _, tokenizer = reference
    texts = [tokenizer.decode(beam, skip_special_tokens=True) for beam in expected]
    common = dict(model="", prompt=PROMPT, n=2, temperature=0, max_tokens=MAX_TOKENS,
                  extra_body={"use_beam_search": True, "best_of": WIDTH})
    reply = client.completions.create(**common)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == texts
    eos = tokenizer.eos_token_id
    assert [c.finish_reason for c in reply.choices] == [
        "stop" if beam[-1] == eos else "length" for beam in expected
    ]
    # Streaming is allowed: every choice arrives once the search is over.
    streamed = ["", ""]
    for chunk in client.completions.create(**common, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts


def test_chat_returns_n_beams(client) -> None:
    reply = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": PROMPT}], n=2, temperature=0,
        max_tokens=6, extra_body={"use_beam_search": True, "best_of": WIDTH},
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.completion_tokens >= 2


def test_logprobs_follow_the_returned_beam(client, reference) -> None:
    expected = _expected(reference, 1, 1.0)[0]
    reply = client.completions.create(
        model="", prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS, logprobs=MAX_LOGPROBS,
        extra_body={"use_beam_search": True, "best_of": WIDTH},
    )
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(expected)
    # The beam's token first, then the top MAX_LOGPROBS (it may rank below them).
    assert all(next(iter(top)) == token and len(top) <= MAX_LOGPROBS + 1
               for token, top in zip(logprobs.tokens, logprobs.top_logprobs))
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs))


def test_client_logprobs_above_the_limit_are_refused(client, stub) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="", prompt=PROMPT, temperature=0, max_tokens=4,
                                  logprobs=MAX_LOGPROBS + 1,
                                  extra_body={"use_beam_search": True, "best_of": WIDTH})
    assert caught.value.param == "logprobs"
    with pytest.raises(grpc.RpcError) as info:
        _grpc_beams(stub, best_of=WIDTH, logprobs=MAX_LOGPROBS + 1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(info.value) == ["logprobs"]


def test_temperature_above_zero_is_refused(client, stub) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="", prompt=PROMPT, n=2, temperature=0.7, max_tokens=4,
                                  extra_body={"use_beam_search": True, "best_of": WIDTH})
    assert caught.value.param == "temperature"
    with pytest.raises(grpc.RpcError) as info:
        _grpc_beams(stub, best_of=WIDTH, temperature=0.7)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(info.value) == ["temperature"]


def _bad_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


def test_cancelling_a_search_frees_its_requests(server: EngineProcess, stub) -> None:
    from protoserve.v1 import discovery_pb2, discovery_pb2_grpc

    request = inference_pb2.GenerateRequest(
        text=PROMPT,
        sampling=common_pb2.SamplingParams(use_beam_search=True, best_of=WIDTH, max_tokens=200,
                                           ignore_eos=True),
    )
    call = stub.Generate(request, timeout=120)
    first = next(call)  # Started: the first step ran; later steps are in flight
    assert first.HasField("started")
    call.cancel()
    with grpc.insecure_channel(server.grpc_address) as channel:
        discovery = discovery_pb2_grpc.DiscoveryStub(channel)
        for _ in range(300):  # polled, not timed: the abort lands within a step or two
            load = discovery.GetLoad(discovery_pb2.GetLoadRequest(), timeout=10)
            if load.num_streams == 0 and load.num_requests_running == 0:
                break
            threading.Event().wait(0.1)
        assert load.num_streams == 0 and load.num_requests_running == 0
        assert load.num_requests_waiting == 0
