"""The profiling forward pass behind --gpu-memory-utilization on CUDA.

The KV cache gets what is left of `utilization x device memory` once everything else this
process will ever hold is counted: the weights, the peak of one step's activations (measured,
not guessed: the worst steps the scheduler can form are run once on a throwaway cache) and
the memory outside torch's allocator (CUDA context, cuBLAS workspaces, other processes on the
same device).

    utilization x total
    |-- non-torch --|-- weights --|-- peak activations --|-- slack --|------ KV cache ------|

Two steps bound the activation peak: one prefill as long as the step budget allows (the
largest attention and MLP intermediates) and the most sequences a step may hold, every one
sampling (the largest logits and sampler buffers, with top-p sorting and logprobs on).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Allocator fragmentation between the profiled peak and a long-running server's steps.
_SLACK_BYTES = 256 * 1024**2
_GIB = 1024**3


@dataclass(frozen=True)
class MemoryProfile:
    total_bytes: int
    weights_bytes: int
    peak_activation_bytes: int
    # Device memory outside torch's allocator: CUDA context, library workspaces, other
    # processes. It counts against the utilization share like everything else.
    non_torch_bytes: int

    def kv_cache_budget(self, utilization: float) -> int:
        allowed = int(self.total_bytes * utilization)
        used = self.non_torch_bytes + self.weights_bytes + self.peak_activation_bytes
        return max(0, allowed - used - _SLACK_BYTES)

    def describe(self, utilization: float) -> str:
        return (
            f"weights {self.weights_bytes / _GIB:.2f} GiB, peak activations "
            f"{self.peak_activation_bytes / _GIB:.2f} GiB, outside torch "
            f"{self.non_torch_bytes / _GIB:.2f} GiB of {self.total_bytes / _GIB:.1f} GiB; "
            f"KV cache budget {self.kv_cache_budget(utilization) / _GIB:.2f} GiB at "
            f"gpu_memory_utilization {utilization}"
        )


def profile_batches(
    *, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, block_size: int
) -> list[ScheduledBatch]:
    """The worst steps the scheduler can form: one longest prefill, then the most sequences
    (each sampling), every one within the step's token budget. Block ids are distinct per
    request and count up from 0, so a cache of `profile_num_blocks(...)` blocks holds them."""
    # Top-p sorts the full vocabulary and logprobs keep a log-softmax copy: the sampler's
    # largest buffers.
    params = SamplingParams(temperature=1.0, top_p=0.9, logprobs=1, max_tokens=1)
    longest = min(max_num_batched_tokens, max_model_len)
    num_sequences = max(1, min(max_num_seqs, max_num_batched_tokens))
    per_sequence = max(1, min(max_model_len, max_num_batched_tokens // num_sequences))
    batches = []
    for lengths in ([longest], [per_sequence] * num_sequences):
        next_block = 0
        requests = []
        for index, length in enumerate(lengths):
            num_blocks = -(-length // block_size)
            blocks = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            # Token id 0 exists in every vocabulary; the values do not change the memory.
            requests.append(ScheduledRequest(
                f"memory-profile-{index}", [0] * length, 0, length, blocks, True, params, length
            ))
        batches.append(ScheduledBatch(requests, sum(lengths)))
    return batches


def profile_num_blocks(batches: list[ScheduledBatch]) -> int:
    return max(sum(len(r.block_ids) for r in batch.requests) for batch in batches)


def profile_memory(
    device: torch.device,
    batches: list[ScheduledBatch],
    run_step: Callable[[ScheduledBatch], object],
    profile_cache_bytes: int,
) -> MemoryProfile:
    """Runs each batch once through `run_step` (the runner's own step, on a throwaway cache of
    `profile_cache_bytes` that already lives on the device) and reads the allocator's peak."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before_steps = torch.cuda.memory_allocated(device)
    weights = before_steps - profile_cache_bytes
    torch.cuda.reset_peak_memory_stats(device)
    for batch in batches:
        run_step(batch)
    torch.cuda.synchronize(device)
    peak_activation = torch.cuda.max_memory_allocated(device) - before_steps
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    return MemoryProfile(
        total_bytes=total,
        weights_bytes=weights,
        peak_activation_bytes=max(0, peak_activation),
        non_torch_bytes=non_torch,
    )
