"""Sliding windows and soft-caps outside the native kernels: the torch backend against
transformers' own Gemma 2 eager attention and sliding-window mask, the torch code that
engine.ops runs on CUDA (and without a build) against the dense reference, and the errors for
invalid options."""
from __future__ import annotations

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
    window_tokens,
)
from transformers import Gemma2Config
from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, eager_attention_forward

from engine import ops
from engine.attention import get_attention_backend
from engine.attention.backend import AttentionMetadata, PrefillSequence
from engine.attention.flash_backend import _flash_options

CPU = torch.device("cpu")


def test_torch_backend_equals_gemma2_eager_attention_with_its_sliding_window_mask() -> None:
    """Twelve tokens: a fresh prefill of all of them, and the same tokens as a chunk of 7
    over 5 cached ones, equal Gemma 2's eager attention (its softcap, the
    sliding_window_causal_mask_function mask) at window 4 and cap 3."""
    gen = fresh_generator()
    window, cap, block_size, num_tokens, cached = 4, 3.0, 4, 12, 5
    config = Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          hidden_size=64, sliding_window=window, attn_logit_softcapping=cap,
                          query_pre_attn_scalar=16)
    module = Gemma2Attention(config, layer_idx=0).eval()
    query = torch.randn(num_tokens, 4, 16, generator=gen)
    key = torch.randn(num_tokens, 2, 16, generator=gen)
    value = torch.randn(num_tokens, 2, 16, generator=gen)
    mask = eager_mask(1, num_tokens, num_tokens,
                      mask_function=sliding_window_causal_mask_function(window))
    expected, _ = eager_attention_forward(
        module, query.transpose(0, 1)[None], key.transpose(0, 1)[None],
        value.transpose(0, 1)[None], mask, scaling=module.scaling, softcap=cap,
    )
    expected = expected[0]  # [tokens, heads, D]

    backend = get_attention_backend("torch")
    table = torch.tensor([2, 0, 3])  # shuffled blocks for 12 tokens
    slots = (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)
    options = {"sliding_window": window, "soft_cap": cap}

    def run(first: int) -> torch.Tensor:
        cache = torch.zeros(2, 4, block_size, 2, 16)
        cache[0].view(-1, 2, 16)[slots[:first]] = key[:first]
        cache[1].view(-1, 2, 16)[slots[:first]] = value[:first]
        prefill = PrefillSequence(0, num_tokens - first, first, table, None)
        metadata = AttentionMetadata(block_size, slots[first:], 0, None, None, None, (prefill,))
        return backend.forward(query[first:], key[first:], value[first:], cache, metadata,
                               module.scaling, **options)

    torch.testing.assert_close(run(0), expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(run(cached), expected[cached:], **TOLERANCES[torch.float32])


@pytest.fixture
def torch_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """engine.ops as on CUDA or without a build: no native module, so its torch code runs."""
    monkeypatch.setattr(ops, "_module_for", lambda device: None)


@pytest.mark.parametrize("window,soft_cap,group,head_dim", WINDOW_CAP_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_torch_code_matches_dense_reference(
    torch_code_path: None, dtype: torch.dtype, window: str | None, soft_cap: float | None,
    group: int, head_dim: int,
) -> None:
    """Decode rows and chunks over a cached context, the blocks outside every window NaN."""
    gen = fresh_generator()
    block_size, num_kv_heads = 16, 2
    sliding_window = window_tokens(window, block_size)
    scale = head_dim**-0.5
    case = make_paged_case(gen, dtype, [1, 15, 17, 40, 300, 600], num_kv_heads, head_dim,
                           block_size)
    query = torch.randn(6, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    starts = [max(0, int(n) - (sliding_window or n)) for n in case.context_lens]
    kv_cache, tables = poison_before(case.kv_cache, case.block_tables, starts)
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, kv_cache, tables, case.context_lens, scale,
                               sliding_window=sliding_window, soft_cap=soft_cap)
    expected = dense_decode(case, query, scale, sliding_window, soft_cap)
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])

    for context_start, chunk in [(0, 37), (block_size + 3, 40), (250, 70)]:
        case = make_paged_case(gen, dtype, [context_start + chunk], num_kv_heads, head_dim,
                               block_size)
        query = torch.randn(chunk, num_kv_heads * group, head_dim, generator=gen).to(dtype)
        first_key = max(0, context_start - (sliding_window or context_start + 1) + 1)
        kv_cache, tables = poison_before(case.kv_cache, case.block_tables, [first_key])
        out = torch.empty_like(query)
        ops.paged_prefill_attention(out, query, kv_cache, tables[0], context_start, scale,
                                    sliding_window=sliding_window, soft_cap=soft_cap)
        expected = dense_prefill(case.kv_cache, case.block_tables[0], query, context_start,
                                 scale, sliding_window, soft_cap)
        torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sliding_window": 0}, "sliding_window must be >= 1"),
        ({"sliding_window": 4.0}, "sliding_window must be an int"),
        ({"sliding_window": True}, "sliding_window must be an int"),
        ({"soft_cap": 0.0}, "soft_cap must be positive"),
        ({"soft_cap": float("inf")}, "soft_cap must be positive and finite"),
        ({"soft_cap": "50"}, "soft_cap must be a float"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "cpu_paged"])
def test_invalid_options_name_the_option(
    backend: str, options: dict[str, object], message: str
) -> None:
    gen = fresh_generator()
    case = make_paged_case(gen, torch.float32, [3], 2, 16, 4)
    query = torch.randn(1, 2, 16, generator=gen)
    key = torch.randn(1, 2, 16, generator=gen)
    metadata = AttentionMetadata(4, torch.tensor([int(case.block_tables[0, 0]) * 4 + 2]), 1,
                                 case.block_tables, case.context_lens, None, ())
    with pytest.raises(ValueError, match=message):
        get_attention_backend(backend).forward(query, key, key, case.kv_cache, metadata, 0.25,
                                               **options)  # type: ignore[arg-type]


def test_flash_attn_window_counts_the_keys_before_the_query() -> None:
    """flash-attn's window_size=(left, right) with causal=True: the query at p sees keys
    [p - left, p], so W keys is left = W - 1."""
    assert _flash_options(None, None) == {}
    assert _flash_options(4096, None) == {"window_size": (4095, 0)}
    assert _flash_options(None, 50) == {"softcap": 50.0}
