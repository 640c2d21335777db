"""prepare_inputs on random mixed batches against a token-by-token reference: ids, positions,
cache slots, sample rows, decode block tables and context lengths, prefill runs, and the
decode mask the torch backend derives."""
from __future__ import annotations

import math
import random

import pytest
import torch

from engine.attention.torch_backend import decode_mask
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.runner.input_prep import prepare_inputs
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)


def _random_batch(rng: random.Random, block_size: int) -> ScheduledBatch:
    """Decodes (some at position 0), fresh prompts, and chunks over a cached context, with
    blocks drawn from a shuffled pool and some requests not sampling (unfinished chunks)."""
    free_blocks = rng.sample(range(1000), 1000)
    requests = []
    for i in range(rng.randint(1, 10)):
        start = rng.choice([0, rng.randint(0, 90)])
        num_tokens = 1 if rng.random() < 0.6 else rng.randint(1, 40)
        total = start + num_tokens + rng.choice([0, 0, rng.randint(1, 5)])
        blocks = [free_blocks.pop() for _ in range(-(-total // block_size))]
        token_ids = [rng.randrange(32000) for _ in range(total)]
        requests.append(ScheduledRequest(
            f"r{i}", token_ids, start, num_tokens, blocks, start + num_tokens == total, GREEDY,
            max(1, start),
        ))
    return ScheduledBatch(requests, sum(r.num_tokens for r in requests))


def _slot(request: ScheduledRequest, position: int, block_size: int) -> int:
    return request.block_ids[position // block_size] * block_size + position % block_size


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_inputs_match_a_token_by_token_reference(block_size: int) -> None:
    rng = random.Random(block_size)
    for _ in range(200):
        batch = _random_batch(rng, block_size)
        inputs = prepare_inputs(batch, block_size, CPU)
        decodes = [r for r in batch.requests if r.num_tokens == 1]
        prefills = [r for r in batch.requests if r.num_tokens != 1]
        rows = [(r, r.start + i) for r in decodes + prefills for i in range(r.num_tokens)]
        assert inputs.input_ids.tolist() == [r.token_ids[p] for r, p in rows]
        assert inputs.positions.tolist() == [p for _, p in rows]
        metadata = inputs.attn_metadata
        assert metadata.slot_mapping.tolist() == [_slot(r, p, block_size) for r, p in rows]
        first_row = {}
        for row, (request, _) in enumerate(rows):
            first_row.setdefault(request.request_id, row)
        assert inputs.row_starts == [first_row[r.request_id] for r in batch.requests]
        sampling = [r for r in batch.requests if r.sample]
        assert inputs.sample_requests == sampling
        assert inputs.sample_rows.tolist() == [
            first_row[r.request_id] + r.num_tokens - 1 for r in sampling
        ]
        every_row = inputs.sample_rows.tolist() == list(range(len(rows)))
        assert inputs.samples_every_row_in_order == every_row
        for tensor in (inputs.input_ids, inputs.positions, inputs.sample_rows,
                       metadata.slot_mapping):
            assert tensor.dtype == torch.int64 and tensor.dim() == 1

        assert metadata.num_decode_tokens == len(decodes)
        assert metadata.decode_mask is None  # derived by the torch backend, the one user
        if decodes:
            context_lens = [r.start + 1 for r in decodes]
            assert metadata.decode_context_lens.tolist() == context_lens
            tables = metadata.decode_block_tables
            width = max(-(-n // block_size) for n in context_lens)
            assert tables.shape == (len(decodes), width) and tables.dtype == torch.int64
            for request, length, table in zip(decodes, context_lens, tables.tolist()):
                used = -(-length // block_size)
                assert table == list(request.block_ids[:used]) + [0] * (width - used)
            mask = decode_mask(metadata.decode_context_lens, width * block_size)
            positions = torch.arange(width * block_size)
            expected = torch.where(positions[None, :] < torch.tensor(context_lens)[:, None],
                                   0.0, -math.inf).view(len(decodes), 1, 1, -1)
            assert torch.equal(mask, expected) and mask.dtype == torch.float32
        else:
            assert metadata.decode_block_tables is None and metadata.decode_context_lens is None

        assert len(metadata.prefills) == len(prefills)
        for request, sequence in zip(prefills, metadata.prefills):
            context_len = request.start + request.num_tokens
            assert sequence.query_start == first_row[request.request_id]
            assert sequence.num_query_tokens == request.num_tokens
            assert sequence.context_start == request.start
            assert sequence.block_table.tolist() == list(
                request.block_ids[: -(-context_len // block_size)]
            )
            if request.start == 0:
                assert sequence.context_mask is None
            else:
                queries = torch.arange(request.start, context_len)[:, None]
                assert torch.equal(sequence.context_mask,
                                   torch.arange(context_len)[None, :] <= queries)


def test_a_pure_decode_batch_needs_no_gather_of_sample_rows() -> None:
    def decode(i: int, start: int, sample: bool = True) -> ScheduledRequest:
        return ScheduledRequest(f"d{i}", list(range(start + 1)), start, 1, [i], sample, GREEDY, 1)

    decodes = prepare_inputs(ScheduledBatch([decode(0, 3), decode(1, 7)], 2), 16, CPU)
    assert decodes.samples_every_row_in_order
    # A chunk that does not sample, or a prefill ahead of a decode in batch order: rows differ.
    chunk = ScheduledRequest("c", list(range(20)), 0, 5, [5], False, GREEDY, 20)
    assert not prepare_inputs(ScheduledBatch([decode(0, 3), chunk], 6), 16, CPU) \
        .samples_every_row_in_order
    prefill = ScheduledRequest("p", list(range(5)), 0, 5, [6], True, GREEDY, 5)
    mixed = prepare_inputs(ScheduledBatch([prefill, decode(1, 7)], 6), 16, CPU)
    assert not mixed.samples_every_row_in_order
    assert mixed.sample_rows.tolist() == [5, 0]


@pytest.mark.parametrize("num_groups", [2, 3])
def test_each_kv_cache_group_gets_its_own_slots_and_tables(num_groups: int) -> None:
    """With several KV cache groups every group's metadata reads that group's table of each
    request; the first group's is attn_metadata itself, the rest is shared."""
    block_size = 4
    rng = random.Random(num_groups)
    for _ in range(100):
        batch = _random_batch(rng, block_size)
        for request in batch.requests:
            # Each further group: another table of the same length (blocks of its own).
            other = [[b + 1000 * g for b in request.block_ids] for g in range(1, num_groups)]
            request.block_tables = [request.block_ids, *other]
        inputs = prepare_inputs(batch, block_size, CPU, num_groups)
        groups = inputs.group_metadata
        assert len(groups) == num_groups and groups[0] is inputs.attn_metadata
        decodes = [r for r in batch.requests if r.num_tokens == 1]
        prefills = [r for r in batch.requests if r.num_tokens != 1]
        rows = [(r, r.start + i) for r in decodes + prefills for i in range(r.num_tokens)]
        for group, metadata in enumerate(groups):
            def slot(request: ScheduledRequest, position: int) -> int:
                table = request.block_tables[group]
                return table[position // block_size] * block_size + position % block_size

            assert metadata.slot_mapping.tolist() == [slot(r, p) for r, p in rows]
            assert metadata.num_decode_tokens == len(decodes)
            if decodes:
                tables = metadata.decode_block_tables.tolist()
                for request, table in zip(decodes, tables, strict=True):
                    needed = request.start // block_size + 1
                    assert table[:needed] == list(request.block_tables[group][:needed])
                assert metadata.decode_context_lens is groups[0].decode_context_lens
            for request, prefill in zip(prefills, metadata.prefills, strict=True):
                needed = -(-(request.start + request.num_tokens) // block_size)
                assert prefill.block_table.tolist() == request.block_tables[group][:needed]
                assert prefill.context_start == request.start
