"""Verification of draft tokens on the decode path: a request's newest token and its drafts
become consecutive decode rows (engine.runner.input_prep), and the decode attention kernel
over those rows equals dense causal attention of the same queries (each query sees the
context up to its own position), with sliding windows and soft-caps; the same rows through
the step's real metadata, next to plain decodes and a prefill chunk."""
from __future__ import annotations

import pytest
import torch
from paged_cases import (
    TOLERANCES,
    dense_attention,
    dense_prefill,
    fresh_generator,
    make_paged_case,
    sequence_kv,
)

from engine import ops
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.runner.input_prep import MAX_DECODE_QUERY_TOKENS, prepare_inputs
from engine.sampling_params import SamplingParams

NUM_KV_HEADS = 2
DTYPES = [torch.float32, torch.bfloat16]


# The native CPU ops (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("native_cpu_ops")


# (cached context before the newest token, query tokens = 1 + drafts, window, soft-cap)
CASES = [
    pytest.param(0, 5, None, None, id="fresh-context"),
    pytest.param(14, 5, None, None, id="rows-cross-a-block-boundary"),
    pytest.param(250, 8, None, None, id="rows-cross-the-decode-partition"),
    pytest.param(300, 5, 7, None, id="window-inside-a-block"),
    pytest.param(600, 4, 300, 2.5, id="window-across-partitions-capped"),
    pytest.param(37, 3, None, 30.0, id="capped"),
]


@pytest.mark.parametrize("context,num_queries,window,soft_cap", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_query_rows_equal_dense_causal_attention(
    dtype: torch.dtype, context: int, num_queries: int, window: int | None,
    soft_cap: float | None,
) -> None:
    gen = fresh_generator()
    group, head_dim, block_size = 4, 64, 16
    total = context + num_queries
    case = make_paged_case(gen, dtype, [total], NUM_KV_HEADS, head_dim, block_size)
    query = torch.randn(num_queries, NUM_KV_HEADS * group, head_dim, generator=gen).to(dtype)
    # One row per query token, each over the same table with the context up to itself.
    tables = case.block_tables.expand(num_queries, -1).contiguous()
    lens = torch.arange(context + 1, total + 1, dtype=torch.int64)
    out = torch.empty_like(query)
    scale = head_dim**-0.5
    ops.paged_decode_attention(out, query, case.kv_cache, tables, lens, scale,
                               sliding_window=window, soft_cap=soft_cap)
    expected = dense_prefill(case.kv_cache, case.block_tables[0], query, context, scale,
                             window, soft_cap)
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])


def _request(name: str, tokens: list[int], start: int, num_tokens: int, blocks: list[int],
             drafts: list[int] = ()) -> ScheduledRequest:
    return ScheduledRequest(name, tokens, start, num_tokens, blocks, True,
                            SamplingParams(temperature=0.0), 1, draft_token_ids=drafts)


def test_a_verifying_request_becomes_decode_rows_beside_decodes_and_a_prefill() -> None:
    """Batch [decode A | verify B (3 drafts) | prefill chunk C | decode D]: A, B's 4 rows and D
    are decode rows (B's over its own table, context lens p+1 .. p+4), C stays a prefill run;
    writing the step's K/V and running decode attention on its metadata gives, for every
    decode row, dense attention at that row's position."""
    gen = fresh_generator()
    block_size, head_dim, heads = 4, 32, 4
    a = _request("a", list(range(9)), 8, 1, [0, 1, 2])
    b = _request("b", list(range(11)), 10, 4, [3, 4, 5, 6], drafts=[5, 6, 7])
    c = _request("c", list(range(6)), 0, 6, [7, 8])
    d = _request("d", list(range(3)), 2, 1, [9])
    batch = ScheduledBatch([a, b, c, d], 12)
    inputs = prepare_inputs(batch, block_size, torch.device("cpu"))
    metadata = inputs.attn_metadata
    assert metadata.num_decode_tokens == 6
    assert metadata.decode_context_lens.tolist() == [9, 11, 12, 13, 14, 3]
    assert inputs.input_ids[:6].tolist() == [8, 10, 5, 6, 7, 2]
    assert inputs.positions[:6].tolist() == [8, 10, 11, 12, 13, 2]
    assert [p.query_start for p in metadata.prefills] == [6]
    # Batch order: A's row, B's last draft row, C's last row, D's row.
    assert inputs.sample_rows.tolist() == [0, 4, 11, 5]
    assert inputs.row_starts == [0, 1, 6, 5]

    num_blocks = 10
    kv_cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, head_dim, generator=gen)
    rows = inputs.input_ids.shape[0]
    key = torch.randn(rows, NUM_KV_HEADS, head_dim, generator=gen)
    value = torch.randn(rows, NUM_KV_HEADS, head_dim, generator=gen)
    ops.write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
    query = torch.randn(6, heads, head_dim, generator=gen)
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, kv_cache, metadata.decode_block_tables,
                               metadata.decode_context_lens, 0.2)
    for row, request in enumerate([a, b, b, b, b, d]):
        length = int(metadata.decode_context_lens[row])
        keys, values = sequence_kv(kv_cache, torch.tensor(request.block_ids), length)
        expected = dense_attention(query[row : row + 1], keys, values,
                                   torch.tensor([length - 1]), 0.2)
        torch.testing.assert_close(out[row : row + 1], expected, **TOLERANCES[torch.float32])


def test_long_draft_runs_stay_prefill_shaped() -> None:
    """Past MAX_DECODE_QUERY_TOKENS query tokens a verification is one prefill run (each
    decode row reads the whole context)."""
    drafts = list(range(MAX_DECODE_QUERY_TOKENS))
    b = _request("b", list(range(20)), 19, 1 + len(drafts), list(range(8)), drafts=drafts)
    inputs = prepare_inputs(ScheduledBatch([b], 1 + len(drafts)), 4, torch.device("cpu"))
    assert inputs.attn_metadata.num_decode_tokens == 0
    assert len(inputs.attn_metadata.prefills) == 1


def test_verification_rows_read_each_kv_cache_group_table() -> None:
    """With two KV cache groups, every decode row of a verifying request writes and reads
    through the group's own table: group 1's slot mapping and decode tables come from the
    request's second table, row by row."""
    block_size = 4
    b = _request("b", list(range(11)), 10, 4, [3, 4, 5, 6], drafts=[5, 6, 7])
    b.block_tables = [[3, 4, 5, 6], [13, 14, 15, 16]]
    a = _request("a", list(range(5)), 4, 1, [0, 1])
    a.block_tables = [[0, 1], [10, 11]]
    inputs = prepare_inputs(ScheduledBatch([a, b], 5), block_size, torch.device("cpu"),
                            num_kv_groups=2)
    first, second = inputs.group_metadata
    assert first is inputs.attn_metadata
    positions = [4, 10, 11, 12, 13]
    tables = [a.block_tables[1], *[b.block_tables[1]] * 4]
    assert second.slot_mapping.tolist() == [
        table[p // block_size] * block_size + p % block_size for table, p in zip(tables, positions)
    ]
    assert second.decode_context_lens.tolist() == [5, 11, 12, 13, 14]
    for row, (table, length) in enumerate(zip(tables, [5, 11, 12, 13, 14])):
        blocks = -(-length // block_size)
        assert second.decode_block_tables[row, :blocks].tolist() == list(table[:blocks])
