"""The csrc/cpu kernels against the pure-torch reference, on fresh random paged caches.

Grid: float32 and bfloat16, GQA ratios 1/2/4/8, head sizes 64/128, block sizes 16/32, ragged
context lengths (1, block boundaries +-1, a few hundred, past the 256-token decode partition),
shuffled block tables, padding slots in slot_mapping, strided q/k/v views; sliding windows
(inside a block, across blocks, across decode partitions, wider than the context) and
soft-caps against the dense reference, with the blocks outside every window poisoned with NaN
so that reading them fails. The extension is built once per process (and cached on disk
across runs) by the module fixture.
"""
from __future__ import annotations

import math

import pytest
import torch
from paged_cases import (
    TOLERANCES,
    WINDOW_CAP_CASES,
    dense_decode,
    dense_prefill,
    fresh_generator,
    make_paged_case,
    poison_before,
    reference_decode,
    reference_prefill,
    strided_rows,
    window_tokens,
)

from engine import ops

NUM_KV_HEADS = 2
DTYPES = [torch.float32, torch.bfloat16]


# The native CPU ops (tests/conftest.py) for every test here.
pytestmark = pytest.mark.usefixtures("native_cpu_ops")


def context_lens_for(block_size: int, gen: torch.Generator) -> list[int]:
    few_hundred = int(torch.randint(150, 400, (1,), generator=gen))
    # 600 spans three 256-token partitions: exercises the split + merge path.
    return [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 1, few_hundred, 600]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_matches_reference(
    dtype: torch.dtype, group: int, head_dim: int, block_size: int
) -> None:
    check_decode(dtype, group, head_dim, block_size, None, None)


@pytest.mark.parametrize("window,soft_cap,group,head_dim", WINDOW_CAP_CASES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_window_and_cap_match_dense_reference(
    dtype: torch.dtype, block_size: int, window: str | None, soft_cap: float | None, group: int,
    head_dim: int,
) -> None:
    check_decode(dtype, group, head_dim, block_size, window_tokens(window, block_size), soft_cap)


def check_decode(dtype: torch.dtype, group: int, head_dim: int, block_size: int,
                 sliding_window: int | None, soft_cap: float | None) -> None:
    gen = fresh_generator()
    case = make_paged_case(
        gen, dtype, context_lens_for(block_size, gen), NUM_KV_HEADS, head_dim, block_size
    )
    num_seqs = len(case.context_lens)
    query = torch.randn(num_seqs, NUM_KV_HEADS * group, head_dim, generator=gen).to(dtype)
    out = torch.empty_like(query)
    scale = head_dim**-0.5
    if sliding_window is None and soft_cap is None:
        ops.paged_decode_attention(
            out, query, case.kv_cache, case.block_tables, case.context_lens, scale
        )
        expected = reference_decode(case, query, scale)
    else:
        expected = dense_decode(case, query, scale, sliding_window, soft_cap)
        window_starts = [max(0, int(n) - (sliding_window or n)) for n in case.context_lens]
        kv_cache, tables = poison_before(case.kv_cache, case.block_tables, window_starts)
        ops.paged_decode_attention(out, query, kv_cache, tables, case.context_lens, scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap)
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_int32_tables_and_strided_views(dtype: torch.dtype) -> None:
    gen = fresh_generator()
    head_dim, group = 128, 4
    case = make_paged_case(gen, dtype, [5, 16, 257, 31], NUM_KV_HEADS, head_dim, 16)
    query = strided_rows(gen, 4, NUM_KV_HEADS * group, head_dim, dtype)
    out_wide = torch.zeros(4, NUM_KV_HEADS * group + 2, head_dim, dtype=dtype)
    out = out_wide[:, 2:]
    ops.paged_decode_attention(
        out, query, case.kv_cache, case.block_tables.to(torch.int32), case.context_lens, 0.1
    )
    torch.testing.assert_close(out.float(), reference_decode(case, query, 0.1), **TOLERANCES[dtype])
    assert not out_wide[:, :2].any(), "wrote outside its rows"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_matches_reference(
    dtype: torch.dtype, group: int, head_dim: int, block_size: int
) -> None:
    check_prefill(dtype, group, head_dim, block_size, None, None)


@pytest.mark.parametrize("window,soft_cap,group,head_dim", WINDOW_CAP_CASES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_window_and_cap_match_dense_reference(
    dtype: torch.dtype, block_size: int, window: str | None, soft_cap: float | None, group: int,
    head_dim: int,
) -> None:
    check_prefill(dtype, group, head_dim, block_size, window_tokens(window, block_size), soft_cap)


def check_prefill(dtype: torch.dtype, group: int, head_dim: int, block_size: int,
                  sliding_window: int | None, soft_cap: float | None) -> None:
    gen = fresh_generator()
    random_start = int(torch.randint(100, 300, (1,), generator=gen))
    random_chunk = int(torch.randint(1, 80, (1,), generator=gen))
    # (cached context, chunk): fresh prompts, block boundaries, several query and key tiles.
    shapes = [
        (0, 1),
        (0, 37),
        (block_size - 1, 2),
        (block_size + 1, 70),
        (3 * block_size, 130),
        (random_start, random_chunk),
    ]
    for context_start, chunk in shapes:
        context_len = context_start + chunk
        case = make_paged_case(gen, dtype, [context_len], NUM_KV_HEADS, head_dim, block_size)
        table = case.block_tables[0]
        query = strided_rows(gen, chunk, NUM_KV_HEADS * group, head_dim, dtype)
        out = torch.empty(query.shape, dtype=dtype)
        scale = head_dim**-0.5
        if sliding_window is None and soft_cap is None:
            ops.paged_prefill_attention(out, query, case.kv_cache, table, context_start, scale)
            expected = reference_prefill(case.kv_cache, table, query, context_start, scale)
        else:
            expected = dense_prefill(case.kv_cache, table, query, context_start, scale,
                                     sliding_window, soft_cap)
            # Blocks before the first query's window are never read.
            first_key = max(0, context_start - (sliding_window or context_start + 1) + 1)
            kv_cache, tables = poison_before(case.kv_cache, case.block_tables, [first_key])
            ops.paged_prefill_attention(out, query, kv_cache, tables[0], context_start, scale,
                                        sliding_window=sliding_window, soft_cap=soft_cap)
        shape = (context_start, chunk)
        torch.testing.assert_close(
            out.float(), expected, **TOLERANCES[dtype], msg=lambda m: f"{shape}: {m}"
        )


@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (8, 128), (3, 80)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_cache_scatters_and_skips_padding(
    dtype: torch.dtype, num_kv_heads: int, head_dim: int
) -> None:
    gen = fresh_generator()
    num_blocks, block_size, num_tokens = 9, 16, 40
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv_cache = kv_cache.to(dtype)
    key = strided_rows(gen, num_tokens, num_kv_heads, head_dim, dtype)
    value = strided_rows(gen, num_tokens, num_kv_heads, head_dim, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    padding = torch.randperm(num_tokens, generator=gen)[:7]
    slots[padding] = -1
    expected = kv_cache.clone()
    keep = slots >= 0
    expected[0].view(-1, num_kv_heads, head_dim)[slots[keep]] = key[keep]
    expected[1].view(-1, num_kv_heads, head_dim)[slots[keep]] = value[keep]
    ops.write_kv_cache(key, value, kv_cache, slots)
    assert torch.equal(kv_cache, expected)


def test_decode_rejects_out_of_range_blocks() -> None:
    gen = fresh_generator()
    case = make_paged_case(gen, torch.float32, [20], NUM_KV_HEADS, 64, 16)
    query = torch.randn(1, NUM_KV_HEADS, 64, generator=gen)
    bad_tables = case.block_tables.clone()
    bad_tables[0, 1] = case.kv_cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode_attention(
            torch.empty_like(query), query, case.kv_cache, bad_tables, case.context_lens, 0.1
        )


def test_decode_sharp_softmax_over_a_long_context() -> None:
    """Four times the usual scale: a few keys dominate, so a partition merged with the wrong
    weight (or a block read from the wrong place) shows up at once."""
    gen = fresh_generator()
    head_dim, context_len = 64, 1000
    case = make_paged_case(gen, torch.bfloat16, [context_len], NUM_KV_HEADS, head_dim, 16)
    query = torch.randn(1, NUM_KV_HEADS, head_dim, generator=gen).to(torch.bfloat16)
    scale = 4.0 / math.sqrt(head_dim)
    out = torch.empty_like(query)
    ops.paged_decode_attention(
        out, query, case.kv_cache, case.block_tables, case.context_lens, scale
    )
    expected = reference_decode(case, query, scale)
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[torch.bfloat16])
