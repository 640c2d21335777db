"""Pipeline micro-batches: a step's rows split only at request boundaries into balanced,
ordered ranges, and the decoder run micro-batch by micro-batch over the sliced metadata
(decodes, a fresh prefill, a prefill after cached context) gives the hidden states of the
whole step. The multi-process tokens are checked in test_tensor_parallel_greedy.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.config import CacheConfig, ModelConfig, ParallelConfig
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.distributed.pipeline import micro_batches, request_bounds, slice_metadata, split_rows
from engine.runner.input_prep import prepare_inputs
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


def _metadata(decodes: int, prefill_lengths: list[int]) -> AttentionMetadata:
    """Decode rows first, then the prefills one after another (input_prep's layout)."""
    rows = decodes + sum(prefill_lengths)
    prefills, start = [], decodes
    for index, length in enumerate(prefill_lengths):
        prefills.append(PrefillSequence(start, length, 3 * index, torch.tensor([index, 9]),
                                        None))
        start += length
    return AttentionMetadata(
        block_size=4, slot_mapping=torch.arange(100, 100 + rows),
        num_decode_tokens=decodes,
        decode_block_tables=torch.arange(decodes * 3).view(decodes, 3) if decodes else None,
        decode_context_lens=torch.arange(5, 5 + decodes) if decodes else None,
        decode_mask=None, prefills=tuple(prefills))


@pytest.mark.parametrize(("decodes", "prefills", "count"), [
    (0, [7], 2),  # one request: never split
    (3, [], 2), (3, [], 3), (3, [], 5),
    (2, [9, 1, 4], 2), (2, [9, 1, 4], 3), (1, [30], 2), (4, [2, 2, 2], 4),
])
def test_splits_fall_on_request_boundaries_in_order(
    decodes: int, prefills: list[int], count: int
) -> None:
    metadata = _metadata(decodes, prefills)
    ranges = split_rows(metadata, count)
    ends = request_bounds(metadata)
    assert len(ranges) == min(count, decodes + len(prefills))
    assert ranges[0][0] == 0 and ranges[-1][1] == ends[-1]
    for (_, stop), (start, end) in zip(ranges, ranges[1:]):
        assert stop == start < end and stop in ends


def test_split_balances_rows() -> None:
    # Four decodes and a 30-row prefill: the prefill alone is the second micro-batch.
    assert split_rows(_metadata(4, [30]), 2) == [(0, 4), (4, 34)]
    assert split_rows(_metadata(0, [5, 5, 5, 5]), 2) == [(0, 10), (10, 20)]
    assert split_rows(_metadata(6, []), 3) == [(0, 2), (2, 4), (4, 6)]


def test_small_steps_pass_whole() -> None:
    # Fewer than min_rows rows per micro-batch: fewer micro-batches, or none.
    assert split_rows(_metadata(8, []), 2, min_rows=64) == [(0, 8)]
    assert split_rows(_metadata(2, [100, 100]), 4, min_rows=64) == [(0, 102), (102, 202)]
    assert len(split_rows(_metadata(0, [64, 64, 64]), 3, min_rows=64)) == 3


def test_sliced_metadata_reassembles_the_step() -> None:
    metadata = _metadata(3, [4, 6, 2])
    parts = [slice_metadata(metadata, start, stop) for start, stop in split_rows(metadata, 3)]
    assert torch.equal(torch.cat([p.slot_mapping for p in parts]), metadata.slot_mapping)
    assert sum(p.num_decode_tokens for p in parts) == 3
    decoded = [p for p in parts if p.num_decode_tokens]
    assert torch.equal(torch.cat([p.decode_block_tables for p in decoded]),  # type: ignore[misc]
                       metadata.decode_block_tables)
    assert torch.equal(torch.cat([p.decode_context_lens for p in decoded]),  # type: ignore[misc]
                       metadata.decode_context_lens)
    offset, rebuilt = 0, []
    for part in parts:
        rebuilt += [(p.query_start + offset, p.num_query_tokens, p.context_start,
                     p.block_table.tolist()) for p in part.prefills]
        offset += part.slot_mapping.numel()
    assert rebuilt == [(p.query_start, p.num_query_tokens, p.context_start,
                        p.block_table.tolist()) for p in metadata.prefills]
    # Layers of one KV cache group share their micro-batch's metadata object too.
    other = _metadata(3, [4, 6, 2])
    batches = micro_batches([metadata, metadata, other], 2)
    assert all(b.layer_metadata[0] is b.layer_metadata[1] is not b.layer_metadata[2]
               for b in batches)


def test_micro_batched_layers_equal_the_whole_step(tiny_llama_dir: Path) -> None:
    runner = ModelRunner(ModelConfig(model=str(tiny_llama_dir), dtype="float32"),
                         CacheConfig(block_size=4, num_blocks=32), max_num_seqs=8)
    model = runner.loaded.model
    tokens = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    a, b, c = tokens[:10], tokens[10:22], tokens[:8] + tokens[22:27]

    def request(rid: str, ids: list[int], start: int, count: int, blocks: list[int]) -> (
            ScheduledRequest):
        sample = start + count == len(ids)
        return ScheduledRequest(rid, ids, start, count, blocks, sample, GREEDY, len(ids))

    # Step 1 caches a's prompt but its last token and b's first 9 tokens.
    runner.execute(ScheduledBatch([request("a", a, 0, 9, [0, 1, 2]),
                                   request("b", b, 0, 9, [3, 4, 5])], 18))
    # Step 2: two decodes, c's prefill after a's first two blocks (a prefix hit), a fresh one.
    batch = ScheduledBatch([
        request("a", a, 9, 1, [0, 1, 2]), request("b", b[:10], 9, 1, [3, 4, 5]),
        request("c", c, 8, 5, [0, 1, 7, 8]), request("d", tokens[27:33], 0, 6, [9, 10]),
    ], 13)
    inputs = prepare_inputs(batch, 4, runner.device)
    layers = [inputs.attn_metadata] * len(runner.kv_caches)
    with torch.inference_mode():
        whole = model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata)
        for count in (2, 3, 4):
            parts = micro_batches(layers, count)
            assert len(parts) > 1  # (fewer than `count` where requests are uneven)
            split = torch.cat([
                model.model.norm(model.run_layers(
                    model.embed(inputs.input_ids[p.start:p.stop]),
                    inputs.positions[p.start:p.stop], runner.kv_caches, p.layer_metadata))
                for p in parts])
            torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


def test_micro_batch_count_is_checked() -> None:
    with pytest.raises(ValueError, match="pipeline-micro-batches"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_micro_batches=0)
