"""`draft_model` speculation: a draft that is the target itself has every draft accepted, a
draft of another family (same vocabulary) has them refused and backs off; either way greedy
output equals transformers' greedy decoding of the target, and seeded sampling replays. The
draft runs on the engine's runner, all requests' draft steps in one batch, each request's
proposal its greedy continuation in transformers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from greedy_reference import assert_concurrent_greedy_matches, make_peaked_model, prompts_from
from transformers import AutoModelForCausalLM

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams
from engine.spec_decode.config import parse_speculative_config
from engine.spec_decode.draft_model import DraftModelProposer


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


def _transformers_greedy(model: torch.nn.Module, token_ids: list[int], count: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), do_sample=False, max_new_tokens=count,
                             min_new_tokens=count, pad_token_id=0)
    return out[0, len(token_ids):].tolist()


def test_batched_proposals_equal_transformers_greedy(models: tuple[Path, Path]) -> None:
    """Several requests' drafts in one batch per draft token, each the draft's own greedy
    continuation, also after a verification kept some drafts and rejected the rest."""
    _, draft = models
    proposer = DraftModelProposer(str(draft), max_num_seqs=8)
    reference = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    prompts = prompts_from(70, [3, 17, 40])
    steps: list[int] = []
    execute = proposer.runner.execute
    proposer.runner.execute = lambda batch: steps.append(len(batch.requests)) or execute(batch)
    first = proposer.propose_batch({str(i): (p, 2 + i) for i, p in enumerate(prompts)})
    assert steps == [3, 3, 2, 1]  # one forward per draft token, all requests together
    for i, prompt in enumerate(prompts):
        assert first[str(i)] == _transformers_greedy(reference, prompt, 2 + i)
    # Request 0 kept one draft, then the target chose another token; request 2 kept all.
    later = {"0": prompts[0] + first["0"][:1] + [5], "2": prompts[2] + first["2"] + [9]}
    again = proposer.propose_batch({rid: (tokens, 3) for rid, tokens in later.items()})
    for rid, tokens in later.items():
        assert again[rid] == _transformers_greedy(reference, tokens, 3)
    for rid in ("0", "1", "2"):
        proposer.forget(rid)
    assert len(proposer._free_blocks) == proposer.runner.num_blocks
