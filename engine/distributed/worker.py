"""A tensor-parallel rank > 0: loads its slice of the model and its KV cache (the same block
ids as rank 0, its own KV heads), then runs whatever rank 0 sends, until STOP:

    FORWARD  the step's inputs -> the forward pass (its all_reduces meet rank 0's)
    LOGITS   hidden rows -> this rank's vocab columns, gathered by rank 0
    STOP     leave
    HEARTBEAT  answer rank 0's check, while the server is idle, that every rank is alive

Started by engine/distributed/launch.py (multiprocessing spawn), on rank 0's machine or on
another one (`engine-serve --headless`).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace

import torch

from engine.config import CacheConfig, LoRAConfig, ModelConfig
from engine.distributed.group import (
    CollectiveClock,
    init_tensor_parallel,
    shutdown_tensor_parallel,
)
from engine.distributed.step_message import (
    MessageKind,
    answer_heartbeat,
    receive_forward,
    receive_header,
    receive_logits_rows,
    receive_lora_step,
)
from engine.models.loader import resolve_device
from engine.runner.kv_memory import allocate_kv_caches
from engine.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs: plain data, pickled once into the spawned process."""

    rank: int
    local_rank: int  # among this machine's ranks: which cores, which CUDA device
    size: int  # tensor-parallel ranks per pipeline stage
    num_stages: int
    micro_batches: int | None  # per step across the stages (None: one per stage)
    micro_batch_min_rows: int
    expert_parallel: bool
    lora: LoRAConfig | None
    master_addr: str
    master_port: int
    timeout_s: float
    model: ModelConfig
    cache: CacheConfig
    max_num_seqs: int
    max_num_batched_tokens: int
    num_threads: int
    cores: tuple[int, ...] | None  # None: not pinned (fewer cores than ranks)
    log_level: int
    parent_pid: int


def rank_model_config(model: ModelConfig, local_rank: int) -> ModelConfig:
    """CUDA: one device per local rank (NCCL needs distinct devices per rank); the CPU
    ranks share the host and the config is unchanged."""
    if resolve_device(model.device).type != "cuda":
        return model
    torch.cuda.set_device(local_rank)
    return replace(model, device=f"cuda:{local_rank}")


def limit_cpu(num_threads: int, cores: tuple[int, ...] | None) -> None:
    """This rank's share of the machine: ranks on one host would otherwise each start a
    thread per core and oversubscribe it many times over."""
    if cores is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(num_threads)


def worker_main(spec: WorkerSpec) -> None:
    # Ctrl-C reaches the whole process group; rank 0's process decides when ranks stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    code = 0
    try:
        limit_cpu(spec.num_threads, spec.cores)
        model = rank_model_config(spec.model, spec.local_rank)
        tp = init_tensor_parallel(
            spec.rank, spec.size, master_addr=spec.master_addr, master_port=spec.master_port,
            timeout_s=spec.timeout_s, device=resolve_device(model.device),
            num_stages=spec.num_stages, micro_batches=spec.micro_batches,
            micro_batch_min_rows=spec.micro_batch_min_rows,
            expert_parallel=spec.expert_parallel,
        )
        runner = ModelRunner(
            model, spec.cache, max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens, tp=tp, lora_config=spec.lora,
        )
        serve_steps(runner)
        shutdown_tensor_parallel()
    except BaseException:  # noqa: BLE001 - rank 0 sees the exit code and the failed collective
        logger.exception("tensor-parallel rank %d failed", spec.rank)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # As the engine core process: no interpreter teardown of torch and the model.
    os._exit(code)


def _exit_with_parent(parent_pid: int) -> None:
    """Never outlive the process that started us, however it ended (polled rather than
    PR_SET_PDEATHSIG, which fires when the starting *thread* ends, and rank 0 may start the
    ranks from a short-lived one)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def serve_steps(runner: ModelRunner) -> None:
    tp, model = runner.tp, runner.loaded.model
    hidden_size = runner.loaded.hf_config.hidden_size
    busy_s, steps = 0.0, 0
    CollectiveClock.reset()
    with torch.inference_mode():
        while True:
            header = receive_header(tp)
            start = time.perf_counter()
            kind = MessageKind(int(header[0]))
            if kind is MessageKind.STOP:
                # The communication share of this rank's work (benchmarks/tensor_parallel.py).
                logger.info("rank %d: %d forward passes, %.3f s busy, %.3f s of it in %d "
                            "collectives", tp.world_rank, steps, busy_s,
                            CollectiveClock.seconds, CollectiveClock.calls)
                return
            if kind is MessageKind.HEARTBEAT:
                answer_heartbeat(tp, int(header[1]))
                continue
            if kind is MessageKind.LORA:  # applies to the FORWARD that follows
                assert runner.lora is not None, "rank 0 sent adapter rows without --enable-lora"
                row_slots, loads = receive_lora_step(tp, header)
                for slot, lora in loads:
                    runner.lora.fill(slot, lora)
                runner.lora.context.step = runner.lora.step_of_rows(row_slots)
                continue
            if kind is MessageKind.FORWARD:
                inputs = receive_forward(tp, header, runner.block_size)
                kv_caches, metadata = runner.kv_caches, inputs.attn_metadata
                if inputs.group_metadata:
                    metadata = runner.layer_metadata(inputs.group_metadata)
                if inputs.scratch_blocks:  # an embedding request's forward (runner/pooling.py)
                    kv_caches = allocate_kv_caches(
                        replace(runner.kv_spec, block_size=inputs.attn_metadata.block_size,
                                num_layers=runner.loaded.num_layers, group_windows=(None,)),
                        inputs.scratch_blocks, runner.device)
                model(inputs.input_ids, inputs.positions, kv_caches, metadata)
                if runner.lora is not None:
                    runner.lora.context.step = None
                steps += 1
            else:
                rows = receive_logits_rows(tp, header, hidden_size, runner.loaded.dtype)
                if tp.stage == 0:  # the LM head's stage
                    model.contribute_logits(rows)
            busy_s += time.perf_counter() - start
