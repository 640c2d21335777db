"""The cpu_paged backend: against the torch backend on mixed steps, end to end through the
model, its selection ("auto"), and the fallback when the native build is impossible."""
from __future__ import annotations

import functools
import logging
import random
from pathlib import Path

import pytest
import torch
from model_factory import build_tiny_model
from paged_cases import TOLERANCES, dense_step, fresh_generator

from engine import native_build, ops
from engine.attention import get_attention_backend, resolve_attention_backend
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.config import CacheConfig, ModelConfig
from engine.runner.input_prep import prepare_inputs
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
CPU = torch.device("cpu")



def mixed_batch(block_size: int, rng: random.Random) -> ScheduledBatch:
    """Decode rows (one at position 0), a chunk over a cached context, a fresh prompt, in a
    shuffled order and on shuffled blocks."""
    free_blocks = rng.sample(range(64), 64)
    shapes = {"d0": (0, 1), "d1": (40, 1), "d2": (block_size, 1), "c": (2 * block_size + 3, 21),
              "p": (0, 37)}
    requests = []
    for request_id, (start, num_tokens) in shapes.items():
        total = start + num_tokens
        blocks = [free_blocks.pop() for _ in range(-(-total // block_size))]
        requests.append(ScheduledRequest(
            request_id, list(range(total)), start, num_tokens, blocks, True, GREEDY, total
        ))
    rng.shuffle(requests)
    return ScheduledBatch(requests, sum(r.num_tokens for r in requests))


# (sliding_window, soft_cap) with block size 16: a window inside a block, one across blocks
# (the chunk's context spans 3 blocks), a cap alone.
STEP_OPTIONS = [(None, None), (5, None), (21, 2.5), (None, 30.0)]


@pytest.mark.parametrize("sliding_window,soft_cap", STEP_OPTIONS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_matches_torch_on_a_mixed_step(
    native_cpu_ops: None, dtype: torch.dtype, head_dim: int, sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """cpu_paged against the torch backend; with a window or cap, both against the dense
    reference."""
    gen = fresh_generator()
    block_size, num_kv_heads, num_heads = 16, 2, 8
    inputs = prepare_inputs(mixed_batch(block_size, random.Random(int(gen.initial_seed()))),
                            block_size, CPU)
    num_tokens = inputs.input_ids.numel()
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    query, key = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads :]
    cache = torch.randn(2, 64, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    reference_cache, paged_cache = cache.clone(), cache.clone()
    scale = head_dim**-0.5

    options: dict[str, int | float] = {}
    if sliding_window is not None:
        options["sliding_window"] = sliding_window
    if soft_cap is not None:
        options["soft_cap"] = soft_cap
    float_cache = reference_cache.float()
    expected = get_attention_backend("torch").forward(
        query.float(), key.float(), value.float(), float_cache, inputs.attn_metadata, scale,
        **options,
    )
    got_torch = get_attention_backend("torch").forward(
        query, key, value, reference_cache, inputs.attn_metadata, scale, **options
    )
    got = get_attention_backend("cpu_paged").forward(
        query, key, value, paged_cache, inputs.attn_metadata, scale, **options
    )
    assert got.dtype == dtype and got.shape == query.shape
    torch.testing.assert_close(got.float(), expected, **TOLERANCES[dtype])
    assert torch.equal(paged_cache, reference_cache), "cache writes differ"
    if options:
        dense = dense_step(query, float_cache, inputs.attn_metadata, scale, sliding_window,
                           soft_cap)
        torch.testing.assert_close(expected, dense, **TOLERANCES[torch.float32])
        torch.testing.assert_close(got_torch.float(), dense, **TOLERANCES[dtype])
        torch.testing.assert_close(got.float(), dense, **TOLERANCES[dtype])


def greedy_run(runner: ModelRunner, prompts: list[list[int]], num_new_tokens: int,
               chunk_size: int, seed: int) -> list[list[int]]:
    """Chunked prefill (chunk_size tokens per step) then decode, every request every step,
    on blocks handed out from a shuffled pool; returns each request's generated tokens."""
    rng = random.Random(seed)
    free_blocks = rng.sample(range(runner.num_blocks), runner.num_blocks)
    tokens = [list(prompt) for prompt in prompts]
    computed = [0] * len(prompts)
    blocks: list[list[int]] = [[] for _ in prompts]
    while any(len(t) - len(p) < num_new_tokens for t, p in zip(tokens, prompts)):
        scheduled = []
        for i, prompt in enumerate(prompts):
            if len(tokens[i]) - len(prompt) >= num_new_tokens:
                continue
            num_tokens = min(len(tokens[i]) - computed[i], chunk_size)
            end = computed[i] + num_tokens
            while len(blocks[i]) * runner.block_size < end:
                blocks[i].append(free_blocks.pop())
            scheduled.append(ScheduledRequest(
                str(i), tokens[i], computed[i], num_tokens, blocks[i], end == len(tokens[i]),
                GREEDY, len(prompt)
            ))
        rng.shuffle(scheduled)
        output = runner.execute(ScheduledBatch(scheduled, sum(r.num_tokens for r in scheduled)))
        for request in scheduled:
            computed[int(request.request_id)] += request.num_tokens
        for request_id, token_id in zip(output.request_ids, output.sampled_token_ids, strict=True):
            tokens[int(request_id)].append(token_id)
    return [t[len(p):] for t, p in zip(tokens, prompts)]


@pytest.fixture(scope="module")
def tiny_model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Head dim 64 (256 / 4 heads), two kv heads; peaky weights so greedy paths diverge fast
    on any mistake."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-64"), hidden_size=256, num_heads=4,
                            num_kv_heads=2, initializer_range=0.1)


def test_model_greedy_tokens_match_torch_backend(native_cpu_ops: None, tiny_model_64: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    gen = fresh_generator()
    prompts = [torch.randint(0, 400, (length,), generator=gen).tolist()
               for length in (1, 7, 16, 17, 40, 75)]
    results = {}
    for backend in ("torch", "cpu_paged"):
        with caplog.at_level(logging.INFO, logger="engine.runner.model_runner"):
            runner = ModelRunner(
                ModelConfig(model=str(tiny_model_64), dtype="float32", attention_backend=backend),
                CacheConfig(block_size=16, num_blocks=96),
                max_num_seqs=8,
            )
        assert runner.attention_backend == backend
        results[backend] = greedy_run(runner, prompts, num_new_tokens=12, chunk_size=24, seed=5)
    assert results["cpu_paged"] == results["torch"]
    chosen = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert chosen == ["attention backend: torch", "attention backend: cpu_paged"]


def test_auto_picks_cpu_paged_when_the_kernels_build(native_cpu_ops: None) -> None:
    assert resolve_attention_backend("auto", CPU, 16) == "cpu_paged"
    assert resolve_attention_backend("torch", CPU, 16) == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("sdpa", CPU, 16)
    with pytest.raises(ValueError, match="multiple of 256"):
        resolve_attention_backend("flash_attn", CPU, 16)
    with pytest.raises(ValueError, match="attention_backend"):
        ModelConfig(model="m", attention_backend="fast")


def test_failed_build_logs_once_and_falls_back(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def failing_build(spec: native_build.ExtensionSpec) -> None:
        raise native_build.NativeBuildError("simulated compiler failure")

    monkeypatch.setattr(ops, "load_extension", failing_build)
    # A fresh per-process memo, so this test sees a first (failing) load.
    monkeypatch.setattr(ops, "_cpu_module",
                        functools.cache(lambda: ops._load("CPU", ops.cpu_extension_spec)))
    gen = fresh_generator()
    with caplog.at_level(logging.DEBUG, logger="engine.ops"):
        assert not ops.native_available("cpu")
        assert resolve_attention_backend("auto", CPU, 16) == "torch"
        # The ops still work, through their torch fallbacks.
        cache = torch.randn(2, 4, 16, 2, 64, generator=gen)
        key, value = torch.randn(3, 2, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
        ops.write_kv_cache(key, value, cache, torch.tensor([5, -1, 40]))
        assert torch.equal(cache[0, 0, 5], key[0]) and torch.equal(cache[1, 2, 8], value[2])
        query = torch.randn(1, 4, 64, generator=gen)
        out = torch.empty_like(query)
        ops.paged_decode_attention(out, query, cache, torch.tensor([[2, 0]]), torch.tensor([20]),
                                   0.125)
        # Blocks 2 then 0; each kv head serves two query heads.
        keys = cache[0, [2, 0]].reshape(-1, 2, 64)[:20].repeat_interleave(2, 1)
        values = cache[1, [2, 0]].reshape(-1, 2, 64)[:20].repeat_interleave(2, 1)
        probs = torch.softmax(torch.einsum("hd,thd->ht", query[0], keys) * 0.125, -1)
        expected = torch.einsum("ht,thd->hd", probs, values)
        torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "simulated compiler failure" in warnings[0].getMessage()
    assert "pure-torch" in warnings[0].getMessage()


def test_disable_env_var_skips_the_build(monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    def unexpected_build(spec: native_build.ExtensionSpec) -> None:
        raise AssertionError("must not build when disabled")

    monkeypatch.setenv(ops.DISABLE_ENV, "1")
    monkeypatch.setattr(ops, "load_extension", unexpected_build)
    monkeypatch.setattr(ops, "_cpu_module",
                        functools.cache(lambda: ops._load("CPU", ops.cpu_extension_spec)))
    with caplog.at_level(logging.WARNING, logger="engine.ops"):
        assert not ops.native_available("cpu")
        assert not ops.native_available("cpu")
    assert len(caplog.records) == 1 and ops.DISABLE_ENV in caplog.records[0].getMessage()
