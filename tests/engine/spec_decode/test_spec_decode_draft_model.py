"""`draft_model` speculation: a draft that is the target itself has every draft accepted, a
draft of another family (same vocabulary) has them refused and backs off; either way greedy
output equals transformers' greedy decoding of the target, and seeded sampling replays."""
from __future__ import annotations

from pathlib import Path

import pytest
from greedy_reference import assert_concurrent_greedy_matches, make_peaked_model, prompts_from

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import parse_speculative_config


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("draft")
    return make_peaked_model(root / "llama", "llama"), make_peaked_model(root / "qwen3", "qwen3")


def _engine(target: Path, draft: Path) -> LLM:
    return LLM(str(target), dtype="float32", num_kv_blocks=128, block_size=4,
               speculative_config={"method": "draft_model", "model": str(draft),
                                   "num_speculative_tokens": 3})


def test_the_target_as_its_own_draft_has_every_draft_accepted(models: tuple[Path, Path]) -> None:
    target, _ = models
    llm = _engine(target, target)
    assert_concurrent_greedy_matches(llm, target, prompts_from(1, [12, 5, 30]))
    stats = llm.core.scheduler.spec.stats  # type: ignore[union-attr]
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_an_unrelated_draft_changes_nothing_but_the_counters(models: tuple[Path, Path]) -> None:
    target, other = models
    llm = _engine(target, other)
    assert_concurrent_greedy_matches(llm, target, prompts_from(2, [9, 17]))
    stats = llm.core.scheduler.spec.stats  # type: ignore[union-attr]
    assert stats.num_drafts > 0
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    prompt = prompts_from(3, [10])[0]
    first = llm.generate([prompt], params)[0].token_ids
    assert llm.generate([prompt, prompt[:4]], [params, params])[0].token_ids == first


def test_draft_model_needs_its_model() -> None:
    with pytest.raises(ValueError, match="'model' is required"):
        parse_speculative_config('{"method": "draft_model", "num_speculative_tokens": 2}')
