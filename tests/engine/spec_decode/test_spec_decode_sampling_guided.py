"""Speculative decoding with sampling and guided decoding on the offline engine: the sampled
tokens are distributed as without speculation (a two-sample chi-square test per output
position over many seeded requests), seeds replay exactly, and constrained outputs equal the
non-speculative engine's greedy ones and match their constraint."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from scipy.stats import chi2_contingency

from engine.core.outputs import RequestOutput
from engine.core.request import FinishReason
from engine.frontend.llm import LLM
from engine.frontend.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from engine.structured import OutputConstraint

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}
CHOICES = ("yes", "no", "maybe \"quoted\"", "a|b (literal)")
NUM_SEEDS = 300
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def engines(tiny_llama_dir: Path) -> tuple[LLM, LLM]:
    plain = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=1024)
    spec = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=1024,
               speculative_config=NGRAM)
    return plain, spec


def assert_full_match(text: str, pattern: str) -> None:
    assert re.fullmatch(pattern, text), text


def _stats(llm: LLM):
    assert llm.core.scheduler.spec is not None
    return llm.core.scheduler.spec.stats.copy()


def _repeating_prompt(llm: LLM) -> list[int]:
    """A prompt whose n-grams predict the model's own likely continuation: a seed and the
    model's greedy continuation of it, twice, then the seed again."""
    seed = [5, 17, 29, 41]
    greedy = llm.generate([seed], SamplingParams(temperature=0.0, max_tokens=12,
                                                 ignore_eos=True))[0].token_ids
    return (seed + greedy) * 2 + seed


def test_sampled_tokens_are_distributed_as_without_speculation(
    engines: tuple[LLM, LLM]
) -> None:
    plain, spec = engines
    prompt = _repeating_prompt(plain)
    # A low temperature lets the model fall into the loops the n-grams then predict.
    params = [SamplingParams(temperature=0.7, top_k=3, seed=seed, max_tokens=NUM_TOKENS,
                             ignore_eos=True) for seed in range(NUM_SEEDS)]
    before = _stats(spec)
    expected = plain.generate([prompt] * NUM_SEEDS, params)
    got = spec.generate([prompt] * NUM_SEEDS, params)
    after = _stats(spec)
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    proposed = after.num_draft_tokens - before.num_draft_tokens
    # Meaningful only when drafts were both kept and refused.
    assert 0 < accepted < proposed, (accepted, proposed)
    for position in range(1, NUM_TOKENS):
        a = [o.token_ids[position] for o in expected]
        b = [o.token_ids[position] for o in got]
        # Tokens seen fewer than 10 times in both samples together share one cell, so every
        # expected count is large enough for the chi-square approximation.
        common = sorted(t for t in set(a) | set(b) if a.count(t) + b.count(t) >= 10)
        table = [[sample.count(t) for t in common] + [sum(x not in common for x in sample)]
                 for sample in (a, b)]
        table = [list(column) for column in zip(*table) if sum(column) > 0]
        if len(table) < 2:
            continue
        table = [list(row) for row in zip(*table)]
        _, p_value, _, _ = chi2_contingency(table)
        assert p_value > 1e-3, (position, table)


def test_seeded_requests_replay_whatever_the_batch(engines: tuple[LLM, LLM]) -> None:
    _, spec = engines
    prompt = _repeating_prompt(spec)
    params = SamplingParams(temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True)
    alone = spec.generate([prompt], params)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    batched = spec.generate([prompt[3:], prompt, prompt[:9]], [others, params, others])
    assert batched[1].token_ids == alone
    assert spec.generate([prompt], params)[0].token_ids == alone


def test_guided_greedy_equals_the_non_speculative_engine(engines: tuple[LLM, LLM]) -> None:
    plain, spec = engines
    tokenizer = spec.grammar_compiler.info.hf_tokenizer
    prompt = tokenizer.encode("abc-12 abc-12 abc-12 abc-12 abc-12", add_special_tokens=False)
    pattern = r"(abc-12 ){4}abc-[0-9]{2}"
    constraints = [OutputConstraint(regex=pattern), OutputConstraint(choice=CHOICES),
                   OutputConstraint(regex=r"[a-c]{2,5}-[0-9]{2}")]
    params = SamplingParams(temperature=0.0, max_tokens=60)
    before = _stats(spec)
    expected = plain.generate([prompt] * 3, params, constraints=constraints)
    got = spec.generate([prompt] * 3, params, constraints=constraints)
    for want, out in zip(expected, got, strict=True):
        assert out.token_ids == want.token_ids
        assert out.finish_reason == want.finish_reason
    text = tokenizer.decode(got[0].token_ids, skip_special_tokens=True)
    assert_full_match(text, pattern)
    assert tokenizer.decode(got[1].token_ids, skip_special_tokens=True) in CHOICES
    assert _stats(spec).num_accepted_tokens > before.num_accepted_tokens
    spec.core.scheduler.check_invariants()


def test_guided_sampling_stays_in_the_language_and_replays(engines: tuple[LLM, LLM]) -> None:
    _, spec = engines
    tokenizer = spec.grammar_compiler.info.hf_tokenizer
    prompt = tokenizer.encode("ab-12 ab-12 ab-12 ab-12", add_special_tokens=False)
    pattern = r"(ab-[0-9]{2} ){2,6}"
    constraint = OutputConstraint(regex=pattern)
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=60) for seed in range(12)]
    first = spec.generate([prompt] * 12, params, constraints=constraint)
    again = spec.generate([prompt] * 12, params, constraints=constraint)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    for out in first:
        assert_full_match(tokenizer.decode(out.token_ids, skip_special_tokens=True), pattern)


def test_stop_strings_cut_where_they_would_without_speculation(
    engines: tuple[LLM, LLM]
) -> None:
    """Stop strings end a speculating request's output where they end the plain one's."""
    plain, spec = engines
    prompt = _repeating_prompt(plain)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tokenizer = spec.grammar_compiler.info.hf_tokenizer
    text = tokenizer.decode(plain.generate([prompt], greedy)[0].token_ids)
    checked = 0
    for start in range(4, min(len(text), 60), 7):
        stop = text[start : start + 3]
        if not stop.strip():
            continue
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
        want = plain.generate([prompt], params)[0]
        got = spec.generate([prompt], params)[0]
        assert got.token_ids == want.token_ids, stop
        assert got.finish_reason == want.finish_reason
        checked += 1
    assert checked >= 3


def _stream_events(llm: LLM, prompt: list[int], tokens: list[int], chunks: list[int],
                   stop: str) -> list:
    """The events of a served stream fed `tokens` in steps of `chunks` tokens (the last
    step finishing with LENGTH)."""
    events: asyncio.Queue = asyncio.Queue()
    stream = RequestStream(0, "r", prompt, SamplingParams(stop=[stop]), events,
                           llm.tokenizer, return_text=True)
    position = 0
    for size in chunks:
        step = tokens[position : position + size]
        position += size
        finished = FinishReason.LENGTH if position >= len(tokens) else None
        done, _ = stream.on_output(RequestOutput("r", step, finish_reason=finished))
        if done:
            break
    out = []
    while not events.empty():
        event = events.get_nowait()
        out.append((list(event.token_ids), event.text) if hasattr(event, "token_ids")
                   else (event.reason, event.num_output_tokens, event.stop_string))
    return out


def test_a_stop_string_inside_a_multi_token_step_ends_the_stream_at_its_token(
    engines: tuple[LLM, LLM]
) -> None:
    """The served stream's events for tokens arriving several per step (as accepted drafts
    do) equal those for the same tokens one per step: same text and tokens up to the stop
    string, same completion token count."""
    plain, _ = engines
    prompt = _repeating_prompt(plain)
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    tokens = plain.generate([prompt], greedy)[0].token_ids
    text = plain.grammar_compiler.info.hf_tokenizer.decode(tokens)
    for start in (3, 11, 20):
        stop = text[start : start + 4]
        one_by_one = _stream_events(plain, prompt, tokens, [1] * len(tokens), stop)
        several = _stream_events(plain, prompt, tokens, [1, 4, 3, 5, 2, 7, 8], stop)
        joined = lambda events: (  # noqa: E731 - the deltas' tokens and text, and the rest
            [t for e in events if isinstance(e[0], list) for t in e[0]],
            "".join(e[1] for e in events if isinstance(e[0], list)),
            [e for e in events if not isinstance(e[0], list)],
        )
        assert joined(several) == joined(one_by_one), stop
        assert joined(several)[2][0][0] is FinishReason.STOP
