"""Tensor parallelism over torch.distributed (gloo on CPU, NCCL on CUDA).

    group.py         rendezvous, this process's rank and its collectives (TensorParallel)
    sharding.py      a DecoderSpec's per-rank sizes and each checkpoint tensor's slice
    step_message.py  one step's prepared inputs as a header tensor and one payload tensor
    launch.py        rank 0 spawns the local worker ranks, pins them, watches them die
    worker.py        a rank > 0: its ModelRunner shard, then forward passes until told to stop
"""
