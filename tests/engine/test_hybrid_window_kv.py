"""Hybrid sliding-window models through the whole engine with KV cache groups: Gemma 2
(window and full layers alternating), Gemma 3 (its own 5 local : 1 global pattern) and Qwen2
with max_window_layers (full layers first, windowed after), W = 8,
blocks of 4, long generations of many requests in a cache too small to hold them all, with
chunked prefill, a prefix hit past the window and preemption. Greedy tokens must equal
transformers'; while a request decodes, each windowed group holds no more than its window's
blocks while the full group holds every block of the request."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_configs import SLIDING, FULL, TEST_WINDOW, family_config
from greedy_reference import VOCAB, assert_transformers_greedy, prompts_from
from transformers import AutoModelForCausalLM

from engine.core.batch import ScheduledBatch
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

NUM_NEW = 32
BLOCK_SIZE = 4
GREEDY_LONG = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
# At a decode step the window's W - 1 earlier positions and the new one touch at most these.
WINDOW_BLOCKS = -(-(TEST_WINDOW - 1) // BLOCK_SIZE) + 1
LAYER_TYPES = {
    "gemma2": [SLIDING, FULL, SLIDING, FULL],
    "gemma3": [SLIDING] * 5 + [FULL],
    "qwen2": [FULL, FULL, SLIDING, SLIDING],
}
# Blocks of the cache: too few for all requests at once, so some are preempted.
NUM_KV_BLOCKS = {"gemma2": 40, "gemma3": 64, "qwen2": 40}

PREFIX = prompts_from(21, [20])[0]  # 5 blocks: past the window
PROMPTS = prompts_from(22, [3, 9], PREFIX) + prompts_from(23, [14, 30, 5, 21])


def build_model(path: Path, family: str) -> Path:
    layer_types = LAYER_TYPES[family]
    config = family_config(
        family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config.layer_types = layer_types
    if family == "qwen2":  # the window applies from layer max_window_layers on
        config.use_sliding_window, config.sliding_window = True, TEST_WINDOW
        config.max_window_layers = layer_types.index(SLIDING)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Larger-than-default weights give peaked logits, so greedy ties cannot flip.
        for param in model.parameters():
            param.normal_(0.0, 0.15 if param.dim() > 1 else 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gemma2", "gemma3", "qwen2"])
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[str, Path]:
    family = request.param
    return family, build_model(tmp_path_factory.mktemp(family), family)


@pytest.mark.parametrize("backend", ["cpu_paged", "torch"])
def test_hybrid_model_equals_transformers_with_bounded_window_blocks(
    family_dir: tuple[str, Path], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    family, model_dir = family_dir
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert reference.config.layer_types == LAYER_TYPES[family]
    assert reference.config.sliding_window == TEST_WINDOW
    # A small token budget mixes chunked prefills with the others' decodes.
    llm = LLM(
        str(model_dir), dtype="float32", attention_backend=backend, block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_KV_BLOCKS[family], max_num_batched_tokens=16,
    )
    kv = llm.core.kv_cache
    windows = kv.group_windows
    assert windows[0] is None and TEST_WINDOW in windows and kv.num_groups > 1
    # One cache tensor per slot, shared by one layer of every group.
    slots = {cache.data_ptr() for cache in llm.runner.kv_caches}
    assert len(slots) == llm.runner.kv_groups.num_slots < len(LAYER_TYPES[family])

    # Per decode row: the request's length after the step, and its blocks held per group.
    held: list[tuple[int, list[int]]] = []
    execute = llm.core.runner.execute

    def observed_execute(batch: ScheduledBatch):  # noqa: ANN202 - the runner's own output
        for scheduled in batch.requests:
            if scheduled.is_decode:
                request = llm.core.scheduler.requests[scheduled.request_id]
                held.append((scheduled.start + 1, kv.held_blocks_by_group(request)))
        return execute(batch)

    monkeypatch.setattr(llm.core.runner, "execute", observed_execute)
    # The shared prefix computed once (one token: it stays cached), then every prompt.
    llm.generate([PREFIX + [5]], SamplingParams(temperature=0.0, max_tokens=1))
    outputs = llm.generate(PROMPTS, GREEDY_LONG)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert len(out.token_ids) == NUM_NEW
        assert_transformers_greedy(reference, prompt, out.token_ids)
    assert [out.num_cached_tokens for out in outputs[:2]] == [20, 20]
    assert llm.core.scheduler.num_preemptions > 0
    llm.core.scheduler.check_invariants()
    assert kv.pool.num_free_blocks == kv.num_blocks

    assert held
    for length, by_group in held:
        for window, blocks in zip(windows, by_group, strict=True):
            if window is None:
                assert blocks == -(-length // BLOCK_SIZE), (length, by_group)
            else:
                assert blocks <= WINDOW_BLOCKS, (length, by_group)
    longest = max(length for length, _ in held)
    assert longest >= 30 + NUM_NEW - 1  # past several windows
