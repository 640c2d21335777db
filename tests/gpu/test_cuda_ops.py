"""The csrc/cuda kernels (and the flash_attn backend, when installed) against the pure-torch
reference. Skipped without a CUDA device; the CPU suite covers the same contracts."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from paged_cases import fresh_generator, make_paged_case, reference_decode, strided_rows

from engine import ops
from engine.attention import get_attention_backend
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.runner.input_prep import prepare_inputs
from engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2e-2},
}
NUM_KV_HEADS = 2


@pytest.fixture(scope="module", autouse=True)
def native_cuda_ops() -> None:
    assert ops.native_available(CUDA), "the native CUDA ops failed to build (see the log)"


@pytest.mark.parametrize("block_size", [16, 32])
# 64/128/256 take the vectorised kernel, 96 the generic one.
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_decode_matches_reference(
    dtype: torch.dtype, group: int, head_dim: int, block_size: int
) -> None:
    gen = fresh_generator()
    # 1300 spans three 512-token partitions: exercises the split + merge kernels.
    lens = [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 1, 333, 1300]
    case = make_paged_case(gen, dtype, lens, NUM_KV_HEADS, head_dim, block_size)
    query = strided_rows(gen, len(lens), NUM_KV_HEADS * group, head_dim, dtype)
    out = torch.empty(query.shape, dtype=dtype, device=CUDA)
    scale = head_dim**-0.5
    ops.paged_decode_attention(
        out,
        query.to(CUDA),
        case.kv_cache.to(CUDA),
        case.block_tables.to(CUDA, torch.int32),
        case.context_lens.to(CUDA),
        scale,
    )
    expected = reference_decode(case, query, scale)
    torch.testing.assert_close(out.float().cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_decode_wide_batch_of_ragged_contexts(dtype: torch.dtype) -> None:
    """Many sequences keep the widest partitions (512 tokens); lengths straddle their edges."""
    gen = fresh_generator()
    block_size, head_dim, group = 16, 128, 4
    lens = [int(n) for n in torch.randint(1, 2100, (96,), generator=gen)] + [511, 512, 513, 1024]
    case = make_paged_case(gen, dtype, lens, NUM_KV_HEADS, head_dim, block_size)
    query = strided_rows(gen, len(lens), NUM_KV_HEADS * group, head_dim, dtype)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=CUDA)
    scale = head_dim**-0.5
    ops.paged_decode_attention(out, query.to(CUDA), case.kv_cache.to(CUDA),
                               case.block_tables.to(CUDA, torch.int32),
                               case.context_lens.to(CUDA), scale)
    expected = reference_decode(case, query, scale)
    torch.testing.assert_close(out.float().cpu(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_write_kv_cache_skips_padding(dtype: torch.dtype) -> None:
    gen = fresh_generator()
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 9, 16, 4, 128, 40
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    cache = cache.to(dtype)
    key = strided_rows(gen, num_tokens, num_kv_heads, head_dim, dtype)
    value = strided_rows(gen, num_tokens, num_kv_heads, head_dim, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:5]] = -1
    keep = slots >= 0
    expected = cache.clone()
    expected[0].view(-1, num_kv_heads, head_dim)[slots[keep]] = key[keep]
    expected[1].view(-1, num_kv_heads, head_dim)[slots[keep]] = value[keep]
    device_cache = cache.to(CUDA)
    ops.write_kv_cache(key.to(CUDA), value.to(CUDA), device_cache, slots.to(CUDA))
    assert torch.equal(device_cache.cpu(), expected)


def _mixed_step(block_size: int) -> ScheduledBatch:
    rng = random.Random(0)
    free_blocks = rng.sample(range(64), 64)
    greedy = SamplingParams(temperature=0.0)
    requests = []
    for request_id, (start, num_tokens) in {"d": (40, 1), "c": (block_size + 3, 21),
                                            "p": (0, 37)}.items():
        total = start + num_tokens
        blocks = [free_blocks.pop() for _ in range(-(-total // block_size))]
        requests.append(ScheduledRequest(
            request_id, list(range(total)), start, num_tokens, blocks, True, greedy, total
        ))
    return ScheduledBatch(requests, sum(r.num_tokens for r in requests))


@pytest.mark.parametrize("backend", ["cuda_paged", "flash_attn"])
def test_cuda_backends_match_torch_on_a_mixed_step(backend: str) -> None:
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    gen = fresh_generator()
    # flash-attn's paged cache needs blocks of a multiple of 256 tokens.
    block_size = 256 if backend == "flash_attn" else 16
    dtype, num_heads, head_dim = torch.bfloat16, 8, 128
    inputs = prepare_inputs(_mixed_step(block_size), block_size, CUDA)
    num_tokens = inputs.input_ids.numel()
    qkv = torch.randn(num_tokens, num_heads + 2 * NUM_KV_HEADS, head_dim, generator=gen)
    qkv = qkv.to(CUDA, dtype)
    query, key = qkv[:, :num_heads], qkv[:, num_heads : num_heads + NUM_KV_HEADS]
    value = qkv[:, num_heads + NUM_KV_HEADS :]
    cache = torch.randn(2, 64, block_size, NUM_KV_HEADS, head_dim, generator=gen).to(CUDA, dtype)
    scale = head_dim**-0.5
    expected = get_attention_backend("torch").forward(
        query.float(), key.float(), value.float(), cache.float(), inputs.attn_metadata, scale
    )
    got = get_attention_backend(backend).forward(query, key, value, cache, inputs.attn_metadata,
                                                 scale)
    torch.testing.assert_close(got.float(), expected, **TOLERANCES[dtype])
