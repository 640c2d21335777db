"""Starting tensor-parallel ranks. Rank 0 is the engine core's own process (scheduler, block
table, sampler); it spawns the other ranks of its machine, each a `worker_main` process
limited to its share of the cores, and watches them: a rank that dies takes the engine core
down with it (the server then turns NOT_SERVING and exits 1), rather than leaving rank 0
waiting in a collective. `engine-serve --headless` runs only the ranks of one more machine.

    machine 0: [rank 0: engine core] [rank 1] ... [rank L-1]      L = ranks per node
    machine k: [rank k*L] ... [rank (k+1)*L - 1]                  (engine-serve --headless)
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import torch
from transformers import AutoConfig

from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.distributed.group import (
    TensorParallel,
    init_tensor_parallel,
    shutdown_tensor_parallel,
)
from engine.distributed.sharding import shard_spec, stage_layers
from engine.distributed.step_message import send_stop
from engine.distributed.worker import WorkerSpec, limit_cpu, rank_model_config, worker_main
from engine.models.decoder_spec import read_decoder_spec
from engine.models.loader import resolve_device, resolve_model_path
from engine.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# torchrun's default rendezvous port, for multi-node runs that name none.
DEFAULT_MASTER_PORT = 29500


def start_model_runner(config: EngineConfig, *, exit_on_rank_death: bool) -> ModelRunner:
    """The generation runner, with its tensor-parallel ranks started when there are any.
    `exit_on_rank_death`: a dying rank ends this process at once (a served engine core;
    offline, the failed collective raises instead)."""
    parallel = config.parallel
    sched = config.scheduler

    def runner(model: ModelConfig, tp: TensorParallel | None = None) -> ModelRunner:
        extra = {} if tp is None else {"tp": tp}
        return ModelRunner(model, config.cache, max_num_seqs=sched.max_num_seqs,
                           max_num_batched_tokens=sched.max_num_batched_tokens,
                           lora_config=config.lora, **extra)

    if parallel.world_size == 1:
        return runner(config.model)
    check_shardable(config)  # before any process starts
    addr, port = rendezvous(parallel)
    layout = cpu_layout(parallel.ranks_per_node)
    processes = spawn_ranks(config, range(1, parallel.ranks_per_node), addr, port, layout)
    # Watched from now on: a rank that fails to load ends a served core at once, instead of
    # after the rendezvous or the first collective times out.
    ranks = RankProcesses(processes, exit_on_rank_death)
    driver_threads, driver_cores = layout[0]
    previous = torch.get_num_threads(), _affinity()
    try:
        # The serving process keeps its threads and cores: only a dedicated core process
        # (which may die with its ranks) is pinned.
        limit_cpu(driver_threads, driver_cores if exit_on_rank_death else None)
        model = rank_model_config(config.model, 0)
        tp = init_tensor_parallel(0, parallel.tensor_parallel_size, master_addr=addr,
                                  master_port=port, timeout_s=parallel.distributed_timeout_s,
                                  device=resolve_device(model.device),
                                  num_stages=parallel.pipeline_parallel_size,
                                  micro_batches=parallel.pipeline_micro_batches,
                                  micro_batch_min_rows=parallel.pipeline_micro_batch_min_tokens,
                                  expert_parallel=parallel.enable_expert_parallel)
        model_runner = runner(model, tp)
    except BaseException:
        ranks.stopping = True
        _kill(processes)
        shutdown_tensor_parallel()
        raise
    model_runner.on_close.append(lambda: ranks.stop(tp))
    if not exit_on_rank_death:
        model_runner.on_close.append(lambda: limit_cpu(previous[0], previous[1]))
    return model_runner


def check_shardable(config: EngineConfig) -> None:
    """Raises ValueError naming --tensor-parallel-size when the model does not split."""
    hf_config = AutoConfig.from_pretrained(resolve_model_path(config.model.model))
    if not hasattr(hf_config, "num_attention_heads") or getattr(hf_config, "is_encoder_decoder",
                                                                False):
        raise ValueError("--tensor-parallel-size / --pipeline-parallel-size > 1 serve decoder "
                         "(generative) models only")
    spec = read_decoder_spec(hf_config)
    parallel = config.parallel
    if parallel.enable_expert_parallel and spec.moe is None:
        # As the reference: the flag only changes MoE layers.
        logger.warning("--enable-expert-parallel is ignored: the model has no MoE layers")
    shard_spec(spec, TensorParallel(size=parallel.tensor_parallel_size,
                                    expert_parallel=parallel.enable_expert_parallel))
    stage_layers(spec.num_layers, TensorParallel(num_stages=parallel.pipeline_parallel_size))


def rendezvous(parallel: ParallelConfig) -> tuple[str, int]:
    """The flags, else MASTER_ADDR / MASTER_PORT, else (one machine) loopback and a free
    port."""
    addr = parallel.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = parallel.master_port or int(os.environ.get("MASTER_PORT", 0))
    if not port:
        port = _free_port(addr) if parallel.nnodes == 1 else DEFAULT_MASTER_PORT
    return addr, port


def _free_port(addr: str) -> int:
    with socket.socket() as probe:
        probe.bind((addr, 0))
        return int(probe.getsockname()[1])


def cpu_layout(num_local: int) -> list[tuple[int, tuple[int, ...] | None]]:
    """(threads, cores) of each local rank: an equal run of this process's cores each, or,
    with fewer cores than ranks, one thread each and no pinning."""
    cores = sorted(_affinity() or range(os.cpu_count() or 1))
    share = len(cores) // num_local
    if share == 0:
        return [(1, None)] * num_local
    return [(share, tuple(cores[i * share : (i + 1) * share])) for i in range(num_local)]


def _affinity() -> tuple[int, ...] | None:
    return tuple(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def spawn_ranks(
    config: EngineConfig, ranks: range, addr: str, port: int,
    layout: list[tuple[int, tuple[int, ...] | None]],
) -> list[BaseProcess]:
    parallel, sched = config.parallel, config.scheduler
    context = multiprocessing.get_context("spawn")  # never fork a process holding threads
    processes = []
    for rank in ranks:
        threads, cores = layout[rank % parallel.ranks_per_node]
        spec = WorkerSpec(
            rank=rank, local_rank=rank % parallel.ranks_per_node,
            size=parallel.tensor_parallel_size, num_stages=parallel.pipeline_parallel_size,
            micro_batches=parallel.pipeline_micro_batches,
            micro_batch_min_rows=parallel.pipeline_micro_batch_min_tokens,
            expert_parallel=parallel.enable_expert_parallel, lora=config.lora,
            master_addr=addr, master_port=port,
            timeout_s=parallel.distributed_timeout_s, model=config.model, cache=config.cache,
            max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
            num_threads=threads, cores=cores, log_level=logging.getLogger().getEffectiveLevel(),
            parent_pid=os.getpid(),
        )
        process = context.Process(target=worker_main, args=(spec,), name=f"tp-rank-{rank}")
        process.start()
        processes.append(process)
    return processes


def _kill(processes: list[BaseProcess]) -> None:
    for process in processes:
        process.kill()
        process.join()


class RankProcesses:
    """Rank 0's local workers: watched from a thread, stopped with the runner."""

    def __init__(self, processes: list[BaseProcess], exit_on_death: bool) -> None:
        self.processes = processes
        self.stopping = False
        self._on_death: Callable[[], None] = (lambda: os._exit(1)) if exit_on_death else (
            lambda: None)
        # Ranks on other machines are not watched here: their death fails the next
        # collective, or the idle loop's heartbeat (ModelRunner.keep_alive), which ends the
        # step loop and the core.
        if processes:
            threading.Thread(target=self._watch, name="tp-rank-watch", daemon=True).start()

    def _watch(self) -> None:
        sentinels = {process.sentinel: process for process in self.processes}
        ready = wait(list(sentinels))
        if self.stopping:
            return
        process = sentinels[ready[0]]  # type: ignore[index]
        process.join()
        logger.error("tensor-parallel %s exited with status %s: the engine core stops",
                     process.name, process.exitcode)
        self._on_death()

    def stop(self, tp: TensorParallel) -> None:
        """STOP to every rank, then wait for them (killing any that does not leave)."""
        self.stopping = True
        if all(process.is_alive() for process in self.processes):
            try:
                send_stop(tp)
            except RuntimeError:  # a rank is gone: the others see rank 0 leave
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        shutdown_tensor_parallel()


def run_headless(config: EngineConfig) -> int:
    """`engine-serve --headless`: this machine's ranks only; returns when they all left (0)
    or as soon as one fails (1, the others killed)."""
    parallel = config.parallel
    check_shardable(config)
    addr, port = rendezvous(parallel)
    first = parallel.node_rank * parallel.ranks_per_node
    processes = spawn_ranks(config, range(first, first + parallel.ranks_per_node), addr, port,
                            cpu_layout(parallel.ranks_per_node))
    pending = {process.sentinel: process for process in processes}
    while pending:
        for sentinel in wait(list(pending)):
            process = pending.pop(sentinel)  # type: ignore[arg-type]
            process.join()
            if process.exitcode != 0:
                logger.error("tensor-parallel %s exited with status %s", process.name,
                             process.exitcode)
                _kill(list(pending.values()))
                return 1
    return 0
