"""The whole engine on a CUDA device: greedy outputs against transformers (float32, with
chunked prefill, shared prefixes and preemption), and KV sizing by --gpu-memory-utilization
after the profiling pass. Skipped without a CUDA device; tests/engine covers the CPU."""
from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch
from greedy_reference import (
    GREEDY,
    assert_concurrent_greedy_matches,
    make_peaked_model,
    prompts_from,
    transformers_greedy,
)

from engine.frontend.llm import LLM
from engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GIB = 1024**3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("llama"), "llama")


def _free_device() -> None:
    """Returns a dropped engine's weights and KV cache to the device for the next test."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["cuda_paged", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_concurrent_greedy_equals_transformers_on_cuda(
    tmp_path: Path, arch: str, backend: str
) -> None:
    model_dir = make_peaked_model(tmp_path / arch, arch)
    prompts = prompts_from(1, [1, 3, 7, 16, 17, 33, 60, 95])
    llm = LLM(str(model_dir), dtype="float32", device="cuda", attention_backend=backend,
              max_num_batched_tokens=40, num_kv_blocks=128)
    assert llm.runner.kv_caches[0].is_cuda
    assert_concurrent_greedy_matches(llm, model_dir, prompts)
    del llm
    _free_device()


def test_shared_prefixes_and_preemption_keep_outputs_on_cuda(llama_dir: Path) -> None:
    system = prompts_from(7, [48])[0]
    prompts = prompts_from(2, [random.Random(i).randrange(1, 30) for i in range(64)], system)
    expected = transformers_greedy(llama_dir, prompts[:6])
    shared = LLM(str(llama_dir), dtype="float32", device="cuda", num_kv_blocks=1024)
    shared.generate([system + [5]], GREEDY)
    outputs = shared.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs[:6]] == expected
    assert [o.num_cached_tokens for o in outputs] == [48] * 64
    del shared
    _free_device()
    tight = LLM(str(llama_dir), dtype="float32", device="cuda", num_kv_blocks=24, block_size=8)
    tight_outputs = tight.generate(prompts[:12], GREEDY)
    assert tight.core.scheduler.num_preemptions > 0
    assert [o.token_ids for o in tight_outputs[:6]] == expected
    assert tight.core.kv_cache.pool.num_free_blocks == 24
    del tight
    _free_device()


def test_seeded_sampling_is_batch_invariant_on_cuda(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", device="cuda", num_kv_blocks=512)
    prompt = prompts_from(4, [12])[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = prompts_from(5, [5, 9, 14, 20, 3, 8, 30])
    mixed = [SamplingParams(temperature=0.8, max_tokens=24)] * len(others)
    assert llm.generate([*others, prompt], [*mixed, seeded])[-1].token_ids == alone
    del llm
    _free_device()


@pytest.mark.parametrize("utilization", [0.2, 0.35])
def test_gpu_memory_utilization_bounds_the_process(llama_dir: Path, utilization: float) -> None:
    """The profiled KV cache fills the allowed share, and the heaviest steps stay inside it."""
    gc.collect()
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    if free_before < utilization * total:
        pytest.skip("the device is busy with other work")
    llm = LLM(str(llama_dir), dtype="float32", device="cuda", max_num_seqs=64,
              max_num_batched_tokens=512, gpu_memory_utilization=utilization)
    kv_bytes = sum(cache.numel() * cache.element_size() for cache in llm.runner.kv_caches)
    # The tiny model's weights and activations are megabytes: the cache gets nearly all of it
    # (less the CUDA context and the allocator slack).
    assert kv_bytes > utilization * total - 2 * GIB
    torch.cuda.reset_peak_memory_stats()
    prompts = prompts_from(9, [random.Random(i).randrange(1, 200) for i in range(64)])
    params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=5, max_tokens=8,
                            ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert all(len(out.token_ids) == 8 for out in outputs)
    free_after, _ = torch.cuda.mem_get_info()
    peak_extra = torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved()
    used_at_peak = (total - free_after) + max(0, peak_extra)
    assert used_at_peak <= utilization * total + 64 * 2**20
    del llm
    _free_device()
