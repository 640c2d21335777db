"""The int8 KV cache (--kv-cache-dtype int8): rows written as int8 values + a float32 scale
per token and head, and attention over them equal to attention over their dequantized
values (decode, prefill over a cached context, windows and caps), on the torch code and on
the native-ops backend; and a model served on it."""
from __future__ import annotations

import pytest
import torch

from engine import ops
from engine.attention.kv_quant import SCALE_BYTES
from engine.attention.torch_backend import write_kv
from paged_cases import dense_attention, fresh_generator

HEAD_DIM, KV_HEADS, GROUP, BLOCK = 64, 2, 3, 16


def _dequantized(cache: torch.Tensor) -> torch.Tensor:
    """The layout, read independently: head_dim int8 values, then a little-endian float32."""
    values = cache[..., :HEAD_DIM].float()
    scale_bytes = cache[..., HEAD_DIM:].contiguous().numpy().view("<f4")
    return values * torch.from_numpy(scale_bytes.copy())


def _int8_cache(num_blocks: int) -> torch.Tensor:
    return torch.zeros(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM + SCALE_BYTES, dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_hold_each_value_within_half_a_step_of_its_scale(dtype: torch.dtype) -> None:
    gen = fresh_generator()
    cache = _int8_cache(4)
    keys = (torch.randn(20, KV_HEADS, HEAD_DIM, generator=gen) * 3).to(dtype)
    values = torch.randn(20, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    slots = torch.randperm(4 * BLOCK, generator=gen)[:20]
    write_kv(keys, values, cache, slots)
    stored = _dequantized(cache).view(2, -1, KV_HEADS, HEAD_DIM)
    for which, written in ((0, keys), (1, values)):
        step = written.float().abs().amax(-1, keepdim=True) / 127
        assert torch.all((stored[which, slots] - written.float()).abs() <= step / 2 + 1e-6)
    untouched = torch.ones(4 * BLOCK, dtype=torch.bool)
    untouched[slots] = False
    assert torch.all(stored[:, untouched] == 0)  # never NaN: the scale of an empty row is 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_write_stores_the_rows_the_torch_code_stores(dtype: torch.dtype) -> None:
    if not ops.native_available():
        pytest.skip("native CPU ops not built")
    gen = fresh_generator()
    keys = (torch.randn(33, KV_HEADS, HEAD_DIM, generator=gen) * 5).to(dtype)
    values = torch.randn(33, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    slots = torch.randperm(4 * BLOCK, generator=gen)[:33]
    slots[3] = -1  # a padding row: skipped
    native, reference = _int8_cache(4), _int8_cache(4)
    ops.write_kv_cache(keys, values, native, slots)
    keep = slots >= 0
    write_kv(keys[keep], values[keep], reference, slots[keep])
    assert torch.equal(native, reference)


def _filled_case(gen: torch.Generator, lengths: list[int]):
    """An int8 cache with `lengths` tokens per sequence in shuffled blocks, and its tables."""
    needed = [-(-n // BLOCK) for n in lengths]
    cache = _int8_cache(sum(needed) + 2)
    pool = torch.randperm(cache.shape[1], generator=gen)
    tables = torch.full((len(lengths), max(needed)), int(pool[-1]), dtype=torch.int64)
    start = 0
    for row, (length, count) in enumerate(zip(lengths, needed)):
        tables[row, :count] = pool[start:start + count]
        start += count
        slots = (tables[row, :count, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]
        write_kv(torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen),
                 torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen), cache, slots)
    return cache, tables


def _sequence(cache: torch.Tensor, table: torch.Tensor, length: int):
    rows = _dequantized(cache)[:, table].reshape(2, -1, KV_HEADS, HEAD_DIM)[:, :length]
    return rows[0], rows[1]


@pytest.mark.parametrize(("window", "cap"), [(None, None), (21, None), (None, 3.0)])
@pytest.mark.parametrize("native", [True, False], ids=["native-ops", "torch"])
def test_decode_attends_over_the_dequantized_values(window, cap, native, monkeypatch) -> None:
    if not native:
        monkeypatch.setenv(ops.DISABLE_ENV, "1")
    gen = fresh_generator()
    lengths = [1, 17, 300, 45]
    cache, tables = _filled_case(gen, lengths)
    query = torch.randn(len(lengths), KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, cache, tables, torch.tensor(lengths), 0.125,
                               sliding_window=window, soft_cap=cap)
    for row, length in enumerate(lengths):
        keys, values = _sequence(cache, tables[row], length)
        expected = dense_attention(query[row:row + 1], keys, values, torch.tensor([length - 1]),
                                   0.125, window, cap)
        torch.testing.assert_close(out[row:row + 1], expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 30])
def test_prefill_over_a_cached_context_attends_over_the_dequantized_values(window) -> None:
    gen = fresh_generator()
    context_start, num_queries = 40, 23
    cache, tables = _filled_case(gen, [context_start + num_queries])
    query = torch.randn(num_queries, KV_HEADS * GROUP, HEAD_DIM, generator=gen)
    out = torch.empty_like(query)
    ops.paged_prefill_attention(out, query, cache, tables[0], context_start, 0.125,
                                sliding_window=window)
    keys, values = _sequence(cache, tables[0], context_start + num_queries)
    positions = torch.arange(context_start, context_start + num_queries)
    expected = dense_attention(query, keys, values, positions, 0.125, window)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_a_model_on_an_int8_cache_holds_more_tokens_and_generates(tiny_llama_dir) -> None:
    from engine.frontend.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = [[5, 17, 23, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7] * 30]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    runs = {}
    for kv_dtype in ("auto", "int8"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=8 * 2**20,
                  kv_cache_dtype=kv_dtype)
        outputs = llm.generate(prompts, params)
        runs[kv_dtype] = (llm.runner.num_blocks, [o.token_ids for o in outputs])
    head_dim = llm.runner.loaded.head_dim
    # float32 rows of 4 * head_dim bytes become head_dim + 4.
    assert runs["int8"][0] == pytest.approx(runs["auto"][0] * 4 * head_dim / (head_dim + 4),
                                            rel=0.02)
    # Quantizing K/V moves the logits a little; on this model's prompts greedy stays put.
    assert runs["int8"][1] == runs["auto"][1]
