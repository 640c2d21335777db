"""Attention sinks (GPT-OSS: a learned logit per head in every softmax denominator) in the
paged backends: fresh prefill, a chunk over cached tokens and a decode row, with and without
a sliding window, against a dense float64 reference and transformers' GPT-OSS eager
attention; the CPU decode kernel (float32 and bf16, contexts split into partitions) as well;
plus the errors for malformed sinks."""
from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig
from transformers.masking_utils import eager_mask, sliding_window_causal_mask_function
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, eager_attention_forward

from engine import ops
from engine.attention import get_attention_backend
from engine.attention.backend import AttentionMetadata, PrefillSequence

HEADS, KV_HEADS, HEAD_DIM, BLOCK, TOKENS = 4, 2, 16, 4, 11
SCALE = HEAD_DIM**-0.5
TABLE = torch.tensor([2, 0, 3])  # shuffled blocks for 11 tokens
SLOTS = (TABLE[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)[:TOKENS]


def _inputs() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(TOKENS, HEADS, HEAD_DIM, generator=gen)
    key = torch.randn(TOKENS, KV_HEADS, HEAD_DIM, generator=gen)
    value = torch.randn(TOKENS, KV_HEADS, HEAD_DIM, generator=gen)
    sinks = torch.randn(HEADS, generator=gen) * 2
    return query, key, value, sinks


def dense_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    sinks: torch.Tensor, window: int | None) -> torch.Tensor:
    """Every row in float64: softmax over the visible keys plus the head's sink logit."""
    q, k, v, s = (t.double() for t in (query, key, value, sinks))
    group = HEADS // KV_HEADS
    out = torch.zeros_like(q)
    for p in range(TOKENS):
        for h in range(HEADS):
            visible = [j for j in range(p + 1) if window is None or p - j < window]
            logits = torch.stack([q[p, h] @ k[j, h // group] for j in visible]) * SCALE
            top = torch.maximum(logits.max(), s[h])
            weights = (logits - top).exp()
            weights = weights / (weights.sum() + (s[h] - top).exp())
            out[p, h] = sum(w * v[j, h // group] for w, j in zip(weights, visible, strict=True))
    return out


def _run(backend_name: str, cached: int, decode: bool, window: int | None,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rows after `cached` tokens already in the cache: as one prefill chunk, or (decode)
    as one decode row (cached = TOKENS - 1)."""
    query, key, value, sinks = _inputs()
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    cache = torch.zeros(2, 4, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    cache[0].view(-1, KV_HEADS, HEAD_DIM)[SLOTS[:cached]] = key[:cached]
    cache[1].view(-1, KV_HEADS, HEAD_DIM)[SLOTS[:cached]] = value[:cached]
    rows = slice(cached, TOKENS)
    if decode:
        metadata = AttentionMetadata(BLOCK, SLOTS[rows], 1, TABLE[None], torch.tensor([TOKENS]),
                                     None, ())
    else:
        mask = None
        if cached:
            positions = torch.arange(TOKENS)
            mask = positions[None, :] <= positions[cached:, None]
        prefill = PrefillSequence(0, TOKENS - cached, cached, TABLE, mask)
        metadata = AttentionMetadata(BLOCK, SLOTS[rows], 0, None, None, None, (prefill,))
    options = {} if window is None else {"sliding_window": window}
    return get_attention_backend(backend_name).forward(
        query[rows], key[rows], value[rows], cache, metadata, SCALE, sinks=sinks, **options)


@pytest.mark.parametrize("backend_name", ["torch", "cpu_paged"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cached,decode", [(0, False), (6, False), (TOKENS - 1, True)],
                         ids=["prefill", "chunk", "decode"])
def test_sinks_match_dense_float64_reference(
    backend_name: str, window: int | None, cached: int, decode: bool
) -> None:
    query, key, value, sinks = _inputs()
    expected = dense_reference(query, key, value, sinks, window)[cached:].float()
    actual = _run(backend_name, cached, decode, window)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # The sinks matter: without them the rows differ.
    plain = dense_reference(query, key, value, torch.full_like(sinks, -1e4), window)[cached:]
    assert not torch.allclose(actual, plain.float(), atol=1e-3)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cached,decode", [(0, False), (6, False), (TOKENS - 1, True)],
                         ids=["prefill", "chunk", "decode"])
def test_bf16_kernels_take_sinks(window: int | None, cached: int, decode: bool) -> None:
    """bf16 rows on cpu_paged: every case runs a native kernel (the AVX-512 prefill and
    decode kernels where the build has them)."""
    query, key, value, sinks = _inputs()
    query, key, value = (t.bfloat16().float() for t in (query, key, value))
    expected = dense_reference(query, key, value, sinks, window)[cached:].float()
    actual = _run("cpu_paged", cached, decode, window, torch.bfloat16).float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 5])
def test_sinks_match_transformers_gpt_oss_eager_attention(window: int | None) -> None:
    query, key, value, sinks = _inputs()
    config = GptOssConfig(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                          head_dim=HEAD_DIM, hidden_size=64, num_hidden_layers=1)
    module = GptOssAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        module.sinks.copy_(sinks)
    mask_function = None if window is None else sliding_window_causal_mask_function(window)
    mask = (eager_mask(1, TOKENS, TOKENS) if mask_function is None
            else eager_mask(1, TOKENS, TOKENS, mask_function=mask_function))
    with torch.no_grad():
        expected, _ = eager_attention_forward(
            module, query.transpose(0, 1)[None], key.transpose(0, 1)[None],
            value.transpose(0, 1)[None], mask, scaling=SCALE)
    torch.testing.assert_close(_run("torch", 0, False, window), expected[0],
                               rtol=1e-5, atol=1e-5)


def test_malformed_sinks_are_refused_naming_them() -> None:
    query, key, value, sinks = _inputs()
    prefill = PrefillSequence(0, TOKENS, 0, TABLE, None)
    metadata = AttentionMetadata(BLOCK, SLOTS, 0, None, None, None, (prefill,))
    cache = torch.zeros(2, 4, BLOCK, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="sinks"):
        get_attention_backend("torch").forward(query, key, value, cache, metadata, SCALE,
                                               sinks=sinks[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 300])
def test_decode_kernel_sinks_over_partitioned_contexts(dtype: torch.dtype,
                                                       window: int | None) -> None:
    """Two sequences of 600 and 37 tokens: the long one spans several kernel partitions,
    whose merge must add each sink once."""
    gen = torch.Generator().manual_seed(11)
    lens, block = [600, 37], 16
    blocks = [-(-n // block) for n in lens]
    cache = torch.randn(2, sum(blocks) + 1, block, KV_HEADS, HEAD_DIM, generator=gen)
    query = torch.randn(len(lens), HEADS, HEAD_DIM, generator=gen)
    sinks = torch.randn(HEADS, generator=gen) * 2
    order = torch.randperm(sum(blocks), generator=gen)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int64)
    tables[0, : blocks[0]] = order[: blocks[0]]
    tables[1, : blocks[1]] = order[blocks[0] :]
    expected = torch.empty(len(lens), HEADS, HEAD_DIM, dtype=torch.float64)
    cache_rounded = cache.to(dtype).double()
    group = HEADS // KV_HEADS
    for s, n in enumerate(lens):
        keys = cache_rounded[0][tables[s, : blocks[s]]].reshape(-1, KV_HEADS, HEAD_DIM)[:n]
        values = cache_rounded[1][tables[s, : blocks[s]]].reshape(-1, KV_HEADS, HEAD_DIM)[:n]
        first = 0 if window is None else max(0, n - window)
        for h in range(HEADS):
            k, v = keys[first:, h // group], values[first:, h // group]
            scores = k @ query[s, h].to(dtype).double() * SCALE
            logits = torch.cat([scores, sinks[h : h + 1].double()])
            expected[s, h] = torch.softmax(logits, 0)[:-1] @ v
    out = torch.empty(query.shape, dtype=dtype)
    options = {} if window is None else {"sliding_window": window}
    ops.paged_decode_attention(out, query.to(dtype), cache.to(dtype), tables, torch.tensor(lens),
                               SCALE, sinks=sinks, **options)
    # bf16: the kernel rounds its probabilities before the value products.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
