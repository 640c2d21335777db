"""The offline LLM and the served engine are one engine: the same requests through
`engine.frontend.llm.LLM` and through a real engine-serve over gRPC (its core in a process
of its own, and on a thread) give the same token ids and finish reasons. Greedy and seeded
sampling, a stop string, an EOS stop, n > 1 and a guided request; the same EOS ids on both
sides (the model's and the tokenizer's)."""
from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine" / "structured"))
from guided_helpers import CODE_REGEX, assert_full_match  # noqa: E402

from engine.core.request import FinishReason  # noqa: E402
from engine.frontend.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.server.proto_convert import FINISH_REASON_TO_PB  # noqa: E402
from engine.structured.constraint import OutputConstraint  # noqa: E402
from protoserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.e2e

# The shared engine-serve's flags (start_engine adds --dtype float32 --kv-cache-memory 64MiB).
SERVED_FLAGS = ("--max-model-len", "256")
_REASON_OF_PB = {pb: reason for reason, pb in FINISH_REASON_TO_PB.items()}
Choices = list[tuple[list[int], FinishReason]]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256,
               kv_cache_memory=64 << 20)


@pytest.fixture(scope="module", params=["process", "thread"])
def channel(request: pytest.FixtureRequest, shared_server: Callable) -> grpc.Channel:
    flags = SERVED_FLAGS if request.param == "process" else (
        *SERVED_FLAGS, "--engine-core", "thread")
    with grpc.insecure_channel(shared_server(*flags).grpc_address) as channel:
        yield channel


def _prompt(case: int, vocab_size: int) -> list[int]:
    """20 ids no other test sends, so no prefix-cache hit differs between the two sides."""
    rng = random.Random(9000 + case)
    return [rng.randrange(3, vocab_size) for _ in range(20)]


def _offline(llm: LLM, prompt: list[int], params: SamplingParams,
             constraint: OutputConstraint | None = None) -> Choices:
    # Each run computes its prompt afresh, as the server does for a prompt it has not seen.
    llm.core.kv_cache.pool.reset_prefix_cache()
    outputs = llm.generate([prompt], params, constraints=constraint)
    return [(out.token_ids, out.finish_reason) for out in outputs]


def _served(channel: grpc.Channel, prompt: list[int], constraint: common_pb2.OutputConstraint
            | None = None, **sampling) -> Choices:
    request = inference_pb2.GenerateRequest(
        token_ids=common_pb2.TokenIds(ids=prompt), return_text=False,
        sampling=common_pb2.SamplingParams(**sampling), constraint=constraint)
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, FinishReason] = {}
    for event in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
        if event.HasField("delta"):
            tokens.setdefault(event.delta.index, []).extend(event.delta.token_ids)
        elif event.HasField("finished"):
            reasons[event.finished.index] = _REASON_OF_PB[event.finished.reason]
    return [(tokens.get(i, []), reasons[i]) for i in sorted(reasons)]


def _both(llm: LLM, channel: grpc.Channel, case: int, sampling: dict,
          constraint: OutputConstraint | None = None) -> Choices:
    prompt = _prompt(case, llm.facts.vocab_size)
    offline = _offline(llm, prompt, SamplingParams(**sampling), constraint)
    pb_constraint = None if constraint is None else common_pb2.OutputConstraint(
        regex=constraint.regex)
    served = _served(channel, prompt, pb_constraint, **sampling)
    assert offline == served
    return offline


def test_greedy_and_seeded_sampling(llm: LLM, channel: grpc.Channel) -> None:
    (greedy,) = _both(llm, channel, 1, {"temperature": 0.0, "max_tokens": 24})
    (sampled,) = _both(llm, channel, 2, {"temperature": 1.0, "top_p": 0.9, "seed": 7,
                                         "max_tokens": 24})
    assert len(greedy[0]) > 0 and len(sampled[0]) > 0


def test_n_choices_draw_the_same_samples(llm: LLM, channel: grpc.Channel) -> None:
    choices = _both(llm, channel, 3, {"temperature": 1.0, "seed": 11, "n": 3, "max_tokens": 16})
    assert len(choices) == 3 and len({tuple(tokens) for tokens, _ in choices}) > 1


def test_stop_string(llm: LLM, channel: grpc.Channel) -> None:
    # A stop string the greedy output contains, past its first tokens.
    params = {"temperature": 0.0, "max_tokens": 32, "ignore_eos": True}
    (full,) = _offline(llm, _prompt(4, llm.facts.vocab_size), SamplingParams(**params))
    assert llm.tokenizer is not None
    text = llm.tokenizer.decode(full[0])
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    (stopped,) = _both(llm, channel, 4, {**params, "stop": [stop]})
    assert stopped[1] is FinishReason.STOP and len(stopped[0]) < len(full[0])


def test_eos_stop(llm: LLM, channel: grpc.Channel) -> None:
    assert llm.tokenizer is not None and llm.tokenizer.eos_token_id is not None
    eos = llm.tokenizer.eos_token_id
    assert eos in llm.processor.limits.eos_token_ids  # the tokenizer's EOS, as served
    (choice,) = _both(llm, channel, 5, {"temperature": 0.0, "max_tokens": 20, "min_tokens": 3,
                                        "logit_bias": {eos: 100.0}})
    assert choice == (choice[0][:3] + [eos], FinishReason.STOP)


def test_guided_regex(llm: LLM, channel: grpc.Channel) -> None:
    (choice,) = _both(llm, channel, 6, {"temperature": 1.0, "seed": 3, "max_tokens": 40},
                      OutputConstraint(regex=CODE_REGEX))
    assert choice[1] is FinishReason.STOP
    assert llm.tokenizer is not None
    assert_full_match(llm.tokenizer.decode(choice[0]), CODE_REGEX)
