"""EAGLE speculation on the whole offline engine: the proposals the engine makes from its
own hidden states equal the reference head's on transformers' hidden states; greedy output
equals non-speculative decoding with chunked prefill, prefix hits, preemption and a mixed
batch (Llama and Qwen3 targets); a head that guesses the target right has every draft
accepted and counted."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eagle_heads import ReferenceHead, make_eagle_head, make_embedding_following_target
from greedy_reference import (
    GREEDY,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
)
from transformers import AutoModelForCausalLM

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams


def _eagle(head_dir: Path, k: int = 3) -> dict:
    # Floor 0: random heads keep proposing, so verification and rollback stay exercised.
    return {"method": "eagle", "model": str(head_dir), "num_speculative_tokens": k,
            "acceptance_floor": 0.0}


def _stats(llm: LLM):
    spec = llm.core.scheduler.spec
    assert spec is not None
    return spec.stats


def test_engine_proposals_equal_the_reference_head(tmp_path: Path) -> None:
    target_dir = make_peaked_model(tmp_path / "target", "llama")
    head_dir = make_eagle_head(tmp_path / "head", target_dir, seed=2)
    llm = LLM(str(target_dir), dtype="float32", num_kv_blocks=128, block_size=4,
              max_num_batched_tokens=16, speculative_config=_eagle(head_dir))
    proposer = llm.core.scheduler.spec.proposer  # type: ignore[union-attr]
    calls: list[tuple[list[int], list[int]]] = []
    batch_sizes: list[int] = []
    propose_batch = proposer.propose_batch

    def recording(wanted: dict) -> dict[str, list[int]]:
        drafts = propose_batch(wanted)
        calls.extend((list(wanted[request_id][0]), drafts[request_id]) for request_id in wanted)
        batch_sizes.append(len(wanted))
        return drafts

    proposer.propose_batch = recording
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.generate(prompts_from(40, [21, 9, 30]), params)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    reference = ReferenceHead(head_dir, target.model.embed_tokens.weight.detach(),
                              lambda rows: target.lm_head(rows).float())
    checked = 0
    for token_ids, drafts in calls:
        if not drafts:
            continue
        with torch.no_grad():
            hidden = target.model(torch.tensor([token_ids])).last_hidden_state[0]
        assert drafts == reference.proposals(token_ids, hidden, 0, len(drafts))
        checked += 1
    assert checked >= 6, calls
    assert max(batch_sizes) > 1  # several requests' drafts in one batched call


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_equals_the_non_speculative_engine(tmp_path: Path, arch: str) -> None:
    """Chunked prefill (16 tokens a step), prompts sharing a prefix (prefix hits), a pool
    small enough to preempt, and rows that do not speculate (logprobs) in the same steps."""
    target_dir = make_peaked_model(tmp_path / arch, arch)
    head_dir = make_eagle_head(tmp_path / "head", target_dir, seed=3)
    shared = prompts_from(50, [12])[0]
    prompts = prompts_from(51, [5, 19, 33], shared_prefix=shared) + prompts_from(52, [1, 26])
    params = [GREEDY, GREEDY, GREEDY,
              SamplingParams(temperature=0.0, max_tokens=32, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=32, repetition_penalty=1.2,
                             ignore_eos=True)]
    plain = LLM(str(target_dir), dtype="float32", num_kv_blocks=256, block_size=4)
    expected = [out.token_ids for out in plain.generate(prompts, params)]
    spec = LLM(str(target_dir), dtype="float32", num_kv_blocks=40, block_size=4,
               max_num_batched_tokens=16, speculative_config=_eagle(head_dir))
    spec.generate([shared + [7]], GREEDY)  # its blocks: the later prompts' prefix hits
    got = spec.generate(prompts, params)
    assert [out.token_ids for out in got] == expected
    assert any(out.num_cached_tokens > 0 for out in got)
    assert spec.core.scheduler.num_preemptions > 0
    assert _stats(spec).num_draft_tokens > 0
    spec.core.scheduler.check_invariants()
    assert spec.core.kv_cache.pool.num_free_blocks == 40


def test_a_head_that_guesses_right_has_every_draft_accepted(tmp_path: Path) -> None:
    target_dir = make_embedding_following_target(
        tmp_path / "target", make_peaked_model(tmp_path / "source", "llama"))
    head_dir = make_eagle_head(tmp_path / "head", target_dir, follows_embedding=True)
    llm = LLM(str(target_dir), dtype="float32", num_kv_blocks=128, block_size=4,
              speculative_config=_eagle(head_dir, k=4))
    assert_concurrent_greedy_matches(llm, target_dir, prompts_from(60, [10, 3, 22]))
    stats = _stats(llm)
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert stats.accepted_per_pos[3] > 0


def test_bf16_verification_on_the_fused_path_keeps_greedy_output(tmp_path: Path) -> None:
    """bf16 (the CPU default: verification rows on the fused decode layers, the head in
    bf16): greedy tokens equal the non-speculative bf16 engine's, drafts accepted."""
    target_dir = make_embedding_following_target(
        tmp_path / "target", make_peaked_model(tmp_path / "source", "llama"))
    head_dir = make_eagle_head(tmp_path / "head", target_dir, follows_embedding=True)
    prompts = prompts_from(61, [10, 20, 3])
    plain = LLM(str(target_dir), dtype="bfloat16", num_kv_blocks=128, block_size=16)
    expected = [out.token_ids for out in plain.generate(prompts, GREEDY)]
    spec = LLM(str(target_dir), dtype="bfloat16", num_kv_blocks=128, block_size=16,
               speculative_config=_eagle(head_dir))
    assert [out.token_ids for out in spec.generate(prompts, GREEDY)] == expected
    assert _stats(spec).num_accepted_tokens > 0
