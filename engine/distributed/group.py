"""This process's place among the tensor-parallel ranks, and the collectives the model runs.

Rendezvous is torch.distributed's TCP store at rank 0's MASTER_ADDR:MASTER_PORT (world size,
rank), so ranks on other machines join exactly as local ones do. Two groups:
- the default group carries the forward pass's collectives (all_reduce, gather of logits)
  and times out after `--distributed-timeout-seconds`: a dead or hung rank fails the step;
- the control group carries only the step header a worker waits on between steps. An idle
  server sends none for hours, so its timeout is long; a dead rank 0 still ends the wait at
  once (its sockets close).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import time

import torch
import torch.distributed as dist

# A worker may wait this long for the next step (an idle server) before its wait fails.
CONTROL_TIMEOUT = timedelta(days=7)


class CollectiveClock:
    """Seconds this process spent in the forward pass's collectives (all_reduce, the logits
    gather): the communication share of a step, for benchmarks/tensor_parallel.py."""

    seconds: float = 0.0
    calls: int = 0

    @classmethod
    def reset(cls) -> None:
        cls.seconds, cls.calls = 0.0, 0


@dataclass(frozen=True)
class TensorParallel:
    """Tensor-parallel rank `rank` of `size` in pipeline stage `stage` of `num_stages`
    (world rank stage * size + rank). size 1 and one stage is the single-process model, whose
    collectives are no-ops (the model code calls them unconditionally)."""

    rank: int = 0
    size: int = 1
    # The device collectives run on: CUDA tensors for NCCL, CPU tensors for gloo.
    device: torch.device = torch.device("cpu")
    control_group: dist.ProcessGroup | None = None
    stage: int = 0
    num_stages: int = 1
    # The stage's tensor-parallel ranks (None: the whole world, when there is one stage).
    group: dist.ProcessGroup | None = None
    # How many micro-batches a step's rows split into, so stages overlap (pipeline.py).
    micro_batches: int = 1
    # A micro-batch's fewest rows (fewer cost about as much: the weights are read anyway).
    micro_batch_min_rows: int = 1
    # MoE layers hold whole experts, a contiguous range per rank (sharding.local_experts).
    expert_parallel: bool = False

    @property
    def is_driver(self) -> bool:
        """World rank 0 schedules, samples and talks to the serving side."""
        return self.rank == 0 and self.stage == 0

    @property
    def world_rank(self) -> int:
        return self.stage * self.size + self.rank

    @property
    def world_size(self) -> int:
        return self.size * self.num_stages

    def stage_peer(self, stage: int) -> int:
        """The world rank of this rank's counterpart (same tensor-parallel rank) in `stage`:
        hidden states pass between counterparts, each holding the whole hidden state."""
        return (stage % self.num_stages) * self.size + self.rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place."""
        if self.size > 1:
            start = time.perf_counter()
            dist.all_reduce(tensor, group=self.group)
            CollectiveClock.seconds += time.perf_counter() - start
            CollectiveClock.calls += 1
        return tensor

    def start_send_to_stage(self, hidden: torch.Tensor,
                            stage: int) -> tuple[dist.Work, torch.Tensor]:
        """Send without waiting for the peer to receive: the work to wait on later, and the
        tensor it sends (which must live until then)."""
        hidden = hidden.contiguous()
        work = dist.isend(hidden, dst=self.stage_peer(stage))
        assert work is not None  # None only for ranks outside the group
        return work, hidden

    def receive_from_stage(self, hidden: torch.Tensor, stage: int) -> torch.Tensor:
        dist.recv(hidden, src=self.stage_peer(stage))
        return hidden

    def gather_columns(self, local: torch.Tensor, total: int) -> torch.Tensor | None:
        """Each rank's [N, C] slice -> rank 0 gets [N, total] (the ranks' slices side by
        side, padding past `total` dropped); the other ranks get None."""
        if self.size == 1:
            return local
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
        start = time.perf_counter()
        dist.gather(local, parts, dst=self.stage * self.size, group=self.group)
        CollectiveClock.seconds += time.perf_counter() - start
        CollectiveClock.calls += 1
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[..., :total]


SINGLE = TensorParallel()


def init_tensor_parallel(
    world_rank: int, size: int, *, master_addr: str, master_port: int, timeout_s: float,
    device: torch.device, num_stages: int = 1, micro_batches: int | None = None,
    micro_batch_min_rows: int = 1, expert_parallel: bool = False,
) -> TensorParallel:
    """Join the rendezvous as `world_rank` of size * num_stages (blocks until every rank
    joined, at most `timeout_s`). `micro_batches`: per step, None for one per stage."""
    # NCCL only where the ranks own CUDA devices; CPU CI never touches it.
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        # The address comes from the flags or MASTER_ADDR / MASTER_PORT (launch.rendezvous);
        # named here rather than written back into this process's environment.
        backend, init_method=f"tcp://{master_addr}:{master_port}", rank=world_rank,
        world_size=size * num_stages, timeout=timedelta(seconds=timeout_s),
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    stage = world_rank // size
    group = None
    if num_stages > 1:  # every rank creates every stage's group, in the same order
        for each in range(num_stages):
            ranks = list(range(each * size, (each + 1) * size))
            created = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
            group = created if each == stage else group
    return TensorParallel(rank=world_rank % size, size=size, device=device,
                          control_group=control, stage=stage, num_stages=num_stages, group=group,
                          micro_batches=num_stages if micro_batches is None else micro_batches,
                          micro_batch_min_rows=micro_batch_min_rows,
                          expert_parallel=expert_parallel)


def all_reduce_min(tp: TensorParallel, value: int) -> int:
    """The smallest `value` over the ranks (the number of KV blocks every rank can hold)."""
    if tp.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=tp.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def shutdown_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
