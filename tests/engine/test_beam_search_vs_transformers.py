"""Beam search (engine/frontend/beam_search.py over the real engine, offline LLM) against
transformers' `generate(num_beams=4, do_sample=False, ...)` on a tiny float32 Llama.

The model's logits are made peaked (large weights) so that beams are far from ties, and its EOS
row is scaled up so that EOS competes: hypotheses finish at EOS, at max_new_tokens, and the
early-stopping test ends some searches before max_new_tokens.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from engine.frontend.beam_search import BeamCandidate, BeamSearch
from engine.errors import InvalidRequestError
from engine.frontend.llm import LLM
from engine.core.request import FinishReason
from engine.sampling_params import SamplingParams

VOCAB = 384
EOS = 2
WIDTH = 4
MAX_NEW_TOKENS = 12


def _make_model(path: Path) -> Path:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=EOS, pad_token_id=None, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.15 if param.dim() > 1 else 0.3)
            # Peaked next-token distributions, and an EOS logit with a wide spread.
            model.lm_head.weight.normal_(0.0, 0.5)
            model.lm_head.weight[EOS] *= 1.5
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_model(tmp_path_factory.mktemp("beam-llama"))


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 5, 8, 12, 20)]


def _reference_beams(model, prompt: list[int], n: int, length_penalty: float, early_stopping):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=WIDTH, do_sample=False,
            num_return_sequences=n, length_penalty=length_penalty, early_stopping=early_stopping,
            max_new_tokens=MAX_NEW_TOKENS, eos_token_id=EOS, pad_token_id=EOS,
            output_scores=True, return_dict_in_generate=True,
        )
    beams = []
    for row in out.sequences[:, len(prompt):].tolist():
        # Finished sequences are padded with EOS after their own EOS.
        beams.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return beams, out.sequences_scores.tolist()


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"),
    [(1.0, False), (-0.5, False), (2.0, False), (1.0, True)],
)
def test_beams_equal_transformers(llm: LLM, reference, length_penalty: float, early_stopping) -> None:
    prompts = _prompts()
    params = SamplingParams(
        temperature=0.0, n=WIDTH, best_of=WIDTH, use_beam_search=True,
        length_penalty=length_penalty, max_tokens=MAX_NEW_TOKENS,
    )
    results = llm.beam_search(prompts, params, early_stopping=early_stopping)
    saw_eos = saw_length = False
    for i, (prompt, outputs) in enumerate(zip(prompts, results)):
        expected, _ = _reference_beams(
            reference, prompt, WIDTH, length_penalty, early_stopping
        )
        assert [o.token_ids for o in outputs] == expected, f"prompt {i}"
        for out in outputs:
            ended_on_eos = out.token_ids[-1] == EOS
            saw_eos |= ended_on_eos
            saw_length |= not ended_on_eos
            assert out.finish_reason == (FinishReason.STOP if ended_on_eos else FinishReason.LENGTH)
    assert saw_length
    if length_penalty != 2.0:  # a strong length bonus keeps every short EOS beam out
        assert saw_eos
    assert llm.core.kv_cache.pool.num_free_blocks == llm.core.kv_cache.num_blocks


def test_n_best_of_width_returns_the_top_beams(llm: LLM, reference) -> None:
    prompt = _prompts()[1]
    params = SamplingParams(temperature=0.0, n=2, best_of=WIDTH, use_beam_search=True,
                            max_tokens=MAX_NEW_TOKENS, logprobs=3)
    outputs = llm.beam_search([prompt], params)[0]
    expected, _ = _reference_beams(reference, prompt, 2, 1.0, False)
    assert [o.token_ids for o in outputs] == expected
    for out in outputs:
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
        for token_id, entry in zip(out.token_ids, out.logprobs):
            assert entry.token_id == token_id and len(entry.top_token_ids) == 3
            assert entry.logprob <= entry.top_logprobs[0]


def test_beam_search_refuses_sampling_fields(llm: LLM) -> None:
    for field, extra in [("temperature", {"temperature": 0.7}), ("top_p", {"top_p": 0.5}),
                         ("stop", {"stop": ("x",)}), ("n", {"n": 5})]:
        params = SamplingParams(**{"temperature": 0.0, "use_beam_search": True, "best_of": 4,
                                   "max_tokens": 4, **extra})
        with pytest.raises(InvalidRequestError) as caught:
            llm.beam_search([[5, 6, 7]], params)
        assert caught.value.field in (field, "best_of")
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6]], SamplingParams(temperature=0.0, use_beam_search=True))


def _step(search: BeamSearch, per_beam: list[list[tuple[int, float]]]) -> None:
    search.step([[BeamCandidate(t, lp) for t, lp in c] for c in per_beam])


def test_a_stop_token_ranked_below_the_width_does_not_finish_a_hypothesis() -> None:
    search = BeamSearch(2, 5, frozenset({0}))
    # K = 4: token 0 (stop) ranks third, so it only counts as a spare candidate.
    _step(search, [[(1, -0.1), (2, -0.2), (0, -0.3), (3, -0.4)]])
    assert search.finished == [] and [b.token_ids for b in search.live] == [(1,), (2,)]
    _step(search, [[(0, -0.05), (4, -1.0)], [(0, -0.01), (5, -2.0)]])
    assert [h.beam.token_ids for h in search.finished] == [(1, 0), (2, 0)]
    assert [h.stop_token_id for h in search.finished] == [0, 0]


def test_early_stopping_true_ends_once_width_hypotheses_exist() -> None:
    search = BeamSearch(2, 10, frozenset({0}), early_stopping=True)
    _step(search, [[(0, -0.1), (1, -0.2), (2, -0.3), (3, -0.4)]])
    assert not search.done and len(search.finished) == 1
    # (2, 0) ranks third: not a hypothesis; (1, 0) is the second one.
    _step(search, [[(0, -0.1), (5, -0.2)], [(0, -0.1), (4, -0.3)]])
    assert search.done and len(search.best(2)) == 2
