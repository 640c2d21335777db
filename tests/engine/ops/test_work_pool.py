"""The kernels' parallel loop (csrc/cpu/work_pool.cpp) against at::parallel_for's.

Every kernel computes each output row (or unit) whole in one call, so however the range is cut
and whichever thread runs a chunk, the results must be bit-identical to OpenMP's static split:
the whole model (every kernel of a bf16 decode and prefill, logprobs included) and the linear
kernel are compared with the pool on and off, at thread counts above and below the cores.
Also: concurrent callers (ops release the GIL; only one region runs on the pool, the others
fall back), a thread count changed between calls, a forked child, PROTOSERVE_WORK_POOL=0.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from model_factory import build_tiny_model

from engine import ops
from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not ops.decode_layers_available(), reason="needs the native ops with AVX512_BF16"
)

REPO_ROOT = Path(__file__).resolve().parents[3]


def _module():
    module = ops._cpu_module()
    assert module is not None
    return module


@pytest.fixture
def threads() -> Iterator[None]:
    """Restores torch's thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _set_pool(on: bool) -> bool:
    return bool(_module().set_work_pool(on))


def _linear_case(tokens: int, out_features: int, in_features: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, generator=gen).to(torch.bfloat16)
    return x, ops.pack_linear_weight(weight), bias


@pytest.mark.parametrize("num_threads", [2, 3, 7])
def test_linear_is_bit_identical_with_and_without_the_pool(num_threads: int, threads) -> None:
    torch.set_num_threads(num_threads)
    for seed, (tokens, out_features, in_features) in enumerate(
        [(1, 40, 64), (1, 2304, 768), (3, 784, 256), (17, 1000, 128), (64, 512, 768),
         (200, 96, 64)]
    ):
        x, packed, bias = _linear_case(tokens, out_features, in_features, seed)
        previous = _set_pool(False)
        try:
            reference = ops.linear_bf16(x, packed, bias, out_features)
            _set_pool(True)
            for _ in range(3):  # repeated regions reuse the woken workers
                assert torch.equal(ops.linear_bf16(x, packed, bias, out_features), reference)
        finally:
            _set_pool(previous)


def _generate(model_dir: Path):
    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=64 << 20, max_num_seqs=8)
    prompts = [[5 + i % 7] * n for i, n in enumerate([3, 17, 40, 9, 70, 25])]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    return [
        (out.token_ids, [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in out.logprobs])
        for out in llm.generate(prompts, params)
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_model_outputs_are_bit_identical_with_and_without_the_pool(
    arch: str, tmp_path: Path, threads
) -> None:
    """Prefill and decode through every kernel the model uses (fused decode layers, paged
    attention, cache writes, norms, rotary, linear or MoE), three threads on two cores."""
    torch.set_num_threads(3)
    model_dir = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=128, num_heads=4,
                                 num_kv_heads=2, num_layers=3)
    previous = _set_pool(False)
    try:
        reference = _generate(model_dir)
        _set_pool(True)
        regions, worker_chunks = _module().work_pool_stats()
        assert _generate(model_dir) == reference
        regions_after, worker_chunks_after = _module().work_pool_stats()
    finally:
        _set_pool(previous)
    # The pool really ran the regions, and its workers took part.
    assert regions_after > regions
    assert worker_chunks_after > worker_chunks


def test_concurrent_callers_each_get_their_own_result(threads) -> None:
    """Ops release the GIL, so regions from several Python threads overlap: one runs on the
    pool, the others on OpenMP's threads; every result must be the caller's own."""
    torch.set_num_threads(2)
    cases = [_linear_case(5 + i, 300 + 16 * i, 256, 100 + i) for i in range(4)]
    previous = _set_pool(False)
    expected = [ops.linear_bf16(x, packed, bias, bias.numel()) for x, packed, bias in cases]
    _set_pool(True)
    failures: list[str] = []

    def hammer(index: int) -> None:
        x, packed, bias = cases[index]
        for _ in range(60):
            if not torch.equal(ops.linear_bf16(x, packed, bias, bias.numel()), expected[index]):
                failures.append(f"caller {index}")
                return

    try:
        workers = [threading.Thread(target=hammer, args=(i,)) for i in range(len(cases))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert not any(worker.is_alive() for worker in workers), "a region never finished"
    finally:
        _set_pool(previous)
    assert not failures


def test_thread_count_changes_between_calls(threads) -> None:
    x, packed, bias = _linear_case(9, 900, 512, 7)
    previous = _set_pool(False)
    reference = ops.linear_bf16(x, packed, bias, 900)
    _set_pool(True)
    try:
        for count in (2, 4, 1, 3, 2):  # the pool is rebuilt for each new count
            torch.set_num_threads(count)
            assert torch.equal(ops.linear_bf16(x, packed, bias, 900), reference)
    finally:
        _set_pool(previous)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, text=True,
        capture_output=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
    )


def test_a_forked_child_gets_a_working_pool() -> None:
    """The child's copy of the pool has no threads: it must build its own, not wait on the
    parent's workers (a hang would hit the subprocess timeout)."""
    result = _run_python("""
        import os, torch
        from engine import ops
        torch.set_num_threads(2)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(7, 256, generator=gen).to(torch.bfloat16)
        w = torch.randn(500, 256, generator=gen).to(torch.bfloat16)
        packed = ops.pack_linear_weight(w)
        expected = ops.linear_bf16(x, packed, None, 500)  # the parent's pool is running
        pid = os.fork()
        if pid == 0:
            ok = all(torch.equal(ops.linear_bf16(x, packed, None, 500), expected)
                     for _ in range(20))
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("child 0"), result.stdout + result.stderr[-2000:]


def test_environment_switch_turns_the_pool_off() -> None:
    result = _run_python("""
        from engine import ops
        module = ops._cpu_module()
        print(module.set_work_pool(True))
    """, PROTOSERVE_WORK_POOL="0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
