"""engine-serve's model-parallel options, spelled as the reference server spells them
(`--tensor-parallel-size` / `-tp`, `--pipeline-parallel-size` / `-pp`, `--headless`), plus
torchrun's multi-node rendezvous (`--nnodes`, `--node-rank`, `--master-addr`,
`--master-port`, or MASTER_ADDR / MASTER_PORT)."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from engine.config import EngineConfig, ParallelConfig

logger = logging.getLogger(__name__)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="processes that each hold a slice of every layer (heads, MLP columns, "
                   "vocabulary), one all_reduce after attention and one after the MLP "
                   "(default: 1)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE layers place whole experts on the --tensor-parallel-size ranks "
                   "(contiguous ranges; routing over all experts on every rank, the partial outputs "
                   "summed) instead of slicing every expert; ignored with a warning for dense models "
                   "(default: False)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="stages of consecutive layers, each of --tensor-parallel-size ranks; "
                   "hidden states pass from stage to stage, a step's requests in "
                   "micro-batches so the stages overlap (default: 1)")
    g.add_argument("--pipeline-micro-batches", type=int, default=None,
                   help="micro-batches of whole requests a step splits into across the "
                   "pipeline stages; 1 passes each step whole (default: one per stage)")
    g.add_argument("--pipeline-micro-batch-min-tokens", type=int, default=64,
                   help="fewest tokens of a micro-batch: a step with fewer per micro-batch "
                   "passes whole, since a few rows cost about as much as dozens (default: 64)")
    g.add_argument("--distributed-timeout-seconds", type=float, default=60.0,
                   help="a collective between tensor-parallel ranks that waits longer fails "
                   "the server instead of hanging it (default: 60.0)")
    g.add_argument("--nnodes", type=int, default=1,
                   help="machines the tensor-parallel ranks are spread over, evenly "
                   "(default: 1)")
    g.add_argument("--node-rank", type=int, default=0,
                   help="this machine's index among --nnodes; 0 serves, the others run "
                   "--headless (default: 0)")
    g.add_argument("--master-addr", default=None,
                   help="address of node 0's rendezvous (default: MASTER_ADDR, else "
                   "127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None,
                   help="port of node 0's rendezvous (default: MASTER_PORT, else a free port "
                   "on one machine, 29500 across several)")
    g.add_argument("--headless", action="store_true",
                   help="run only this node's tensor-parallel ranks, no gRPC or REST "
                   "(--node-rank >= 1; default: False)")


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    """ValueError (one line, the flag named) for values that cannot work."""
    if args.headless and args.node_rank < 1:
        raise ValueError("--headless runs the ranks of another machine: give --node-rank >= 1 "
                         "(node 0 serves)")
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        pipeline_micro_batches=args.pipeline_micro_batches,
        pipeline_micro_batch_min_tokens=args.pipeline_micro_batch_min_tokens,
        distributed_timeout_s=args.distributed_timeout_seconds,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def serve_headless(config_of: Callable[[], EngineConfig]) -> int:
    """`engine-serve --headless`: this node's ranks until they leave (0) or one fails (1)."""
    from engine.distributed.launch import run_headless  # torch: only once it is needed
    from engine.errors import ModelLoadError

    try:
        config = config_of()
        parallel = config.parallel
        first = parallel.node_rank * parallel.ranks_per_node
        logger.info("headless: ranks %d-%d of %d", first,
                    first + parallel.ranks_per_node - 1, parallel.world_size)
        return run_headless(config)
    except (ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
