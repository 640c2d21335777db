"""Streamed and non-streamed answers agree, through the real engine + bridge (`role="all"`):
echo with logprobs, spaces between special tokens, best_of selection and its usage, and the
fields the reference server refuses (streamed best_of != n, suffix)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from engine_process import EngineProcess
from special_token_spacing_reference import reference_output_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from protoserve.v1 import common_pb2, inference_pb2

PROMPTS = ["the quick brown fox", "a river ran"]
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(shared_server: Callable[..., EngineProcess]) -> EngineProcess:
    # test_generation_params.py's flags (this module asks for at most 2 logprobs), so the two
    # modules share one server.
    return shared_server("--max-model-len", "256", "--max-logprobs", "5", role="all")


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _generate(stub, prompt: str = PROMPTS[0], **sampling) -> list[inference_pb2.GenerateResponse]:
    request = inference_pb2.GenerateRequest(
        text=prompt, return_prompt_token_ids=True, sampling=common_pb2.SamplingParams(**sampling)
    )
    return list(stub.Generate(request, timeout=60))


def _tokens(events, index: int = 0) -> list[int]:
    return [t for e in events if e.HasField("delta") and e.delta.index == index
            for t in e.delta.token_ids]


def _text(events, index: int = 0) -> str:
    return "".join(e.delta.text for e in events if e.HasField("delta") and e.delta.index == index)


# ----- echo + logprobs ------------------------------------------------------------------------

LOGPROB_FIELDS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _concatenated_stream(chunks) -> dict[int, dict[str, Any]]:
    """Per choice index: the streamed text and every logprobs list, concatenated."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            joined = choices.setdefault(
                choice.index, {"text": "", "first": None, **{f: [] for f in LOGPROB_FIELDS}})
            joined["text"] += choice.text
            if choice.logprobs is not None:
                if joined["first"] is None:
                    joined["first"] = choice
                for field in LOGPROB_FIELDS:
                    joined[field] += getattr(choice.logprobs, field)
    return choices


def test_streamed_echo_carries_the_prompt_logprobs(client, tiny_llama_dir, hf_tokenizer) -> None:
    common = dict(model="", prompt=PROMPTS, max_tokens=3, temperature=0.0, seed=5, echo=True,
                  logprobs=2, extra_body={"ignore_eos": True})
    reply = client.completions.create(**common)
    streamed = _concatenated_stream(client.completions.create(**common, stream=True))
    assert sorted(streamed) == [c.index for c in reply.choices] == [0, 1]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for choice, prompt in zip(reply.choices, PROMPTS):
        joined = streamed[choice.index]
        assert joined["text"] == choice.text and choice.text.startswith(prompt)
        # The first streamed chunk is the echoed prompt, with its logprobs.
        prompt_ids = hf_tokenizer.encode(prompt)
        first = joined["first"]
        assert first.text == prompt
        assert len(first.logprobs.tokens) == len(prompt_ids)
        assert first.logprobs.token_logprobs[0] is None and first.logprobs.top_logprobs[0] is None
        assert first.logprobs.text_offset[0] == 0
        # Streamed logprobs, concatenated, are the non-streamed ones.
        assert joined["tokens"] == choice.logprobs.tokens
        assert joined["text_offset"] == choice.logprobs.text_offset
        assert joined["token_logprobs"] == pytest.approx(choice.logprobs.token_logprobs)
        assert [top and pytest.approx(top) for top in choice.logprobs.top_logprobs] == (
            joined["top_logprobs"])
        # The prompt's scores are the model's: transformers' log-softmax of the prompt.
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)[:-1].gather(
            -1, torch.tensor(prompt_ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()
        served = first.logprobs.token_logprobs[1:]
        assert served == pytest.approx(expected, abs=1e-4)


# ----- spaces_between_special_tokens -------------------------------------------------------------

def test_spaces_between_special_tokens_on_both_surfaces(stub, client, hf_tokenizer) -> None:
    im_start, im_end = hf_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # Sampling among added and ordinary tokens only, so that they sit side by side.
    sampling = dict(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True,
                    allowed_token_ids=[im_start, im_end, 40, 41, 42, 43])
    for spaces in (True, False):
        events = _generate(stub, skip_special_tokens=False,
                           spaces_between_special_tokens=spaces, **sampling)
        output = _tokens(events)
        kinds = [t in (im_start, im_end) for t in output]
        assert any(a != b for a, b in zip(kinds, kinds[1:])), output
        prompt = list(events[0].started.prompt_token_ids)
        expected = (reference_output_text(hf_tokenizer, prompt, output) if spaces
                    else hf_tokenizer.decode(output, skip_special_tokens=False))
        assert _text(events) == expected
        body = dict(model="", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, seed=5,
                    extra_body={"ignore_eos": True, "skip_special_tokens": False,
                                "allowed_token_ids": sampling["allowed_token_ids"],
                                "spaces_between_special_tokens": spaces})
        assert client.completions.create(**body).choices[0].text == expected
        streamed = _concatenated_stream(client.completions.create(**body, stream=True))
        assert streamed[0]["text"] == expected


# ----- best_of ------------------------------------------------------------------------------------

def test_best_of_over_grpc_returns_the_best_n_and_counts_every_candidate(stub) -> None:
    sampling = dict(temperature=1.0, seed=11, max_tokens=5, ignore_eos=True)
    candidates = _generate(stub, n=3, logprobs=0, **sampling)
    scores = {
        i: sum(entry.chosen.logprob for e in candidates if e.HasField("delta")
               and e.delta.index == i for entry in e.delta.logprobs)
        for i in range(3)
    }
    ranked = sorted(scores, key=lambda i: -scores[i])
    events = _generate(stub, n=2, best_of=3, **sampling)
    assert events[0].HasField("started") and events[-1].HasField("usage")
    deltas = [e.delta for e in events if e.HasField("delta")]
    finished = [e.finished for e in events if e.HasField("finished")]
    assert {d.index for d in deltas} == {0, 1} and [f.index for f in finished] == [0, 1]
    # Best first, renumbered 0..n-1; no logprobs were asked, so none are sent.
    assert [_tokens(events, i) for i in (0, 1)] == [_tokens(candidates, i) for i in ranked[:2]]
    assert all(not d.logprobs for d in deltas)
    assert [f.completion_tokens for f in finished] == [5, 5]
    # Usage counts every token generated, the discarded candidate's too.
    assert events[-1].usage.completion_tokens == 3 * 5


def test_best_of_over_rest_counts_every_candidate(client) -> None:
    reply = client.completions.create(model="", prompt=PROMPTS[0], n=2, best_of=3, seed=11,
                                      max_tokens=5, temperature=1.0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.completion_tokens == 3 * 5
    chat = client.chat.completions.create(model="", messages=CHAT, n=1, seed=3, max_tokens=4,
                                          temperature=1.0,
                                          extra_body={"best_of": 2, "ignore_eos": True})
    assert [c.index for c in chat.choices] == [0]
    assert chat.usage.completion_tokens == 2 * 4


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_best_of_other_than_n_is_refused_naming_the_field(client, endpoint) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "completions":
            client.completions.create(model="", prompt=PROMPTS[0], n=1, best_of=2, stream=True,
                                      max_tokens=2)
        else:
            client.chat.completions.create(model="", messages=CHAT, n=1, stream=True,
                                           max_tokens=2, extra_body={"best_of": 2})
    assert caught.value.status_code == 400
    assert caught.value.param == "best_of" and "best_of" in caught.value.message


# ----- suffix -------------------------------------------------------------------------------------

def test_suffix_is_refused_naming_the_field(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="", prompt=PROMPTS[0], suffix="tail", max_tokens=2)
    # The OpenAI error envelope, as the SDK reads it.
    assert caught.value.status_code == 400
    error = caught.value.body
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == "suffix" and "suffix is not currently supported" in error["message"]
