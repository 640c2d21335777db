"""Which slice of the model one tensor-parallel rank holds (Megatron-style):

    qkv_proj      column-parallel by heads: rank r holds q heads [r*Hq/N, (r+1)*Hq/N) and the
                  KV heads they read (split the same way; when N > KV heads, each rank holds
                  the one KV head its q heads share, replicated over N/KV ranks)
    o_proj        row-parallel: the columns of the rank's q heads; all_reduce after it
    gate_up_proj  column-parallel: gate and up each split, so each rank's rows stay [gate|up]
    down_proj     row-parallel; all_reduce after it
    experts       each expert's intermediate dim split as gate_up/down are (see below)
    embed_tokens  vocab-parallel: rows [r*Vp, (r+1)*Vp), Vp = ceil(V/N), zero-padded
    lm_head       vocab-parallel likewise; rank 0 gathers the logits
    norms, router replicated
Biases of row-parallel projections are added once: rank 0 loads them, the others zeros.

Experts are split by intermediate dim rather than by expert: FusedExperts (and its native
kernel) then runs unchanged on [E, 2I/N, H] / [E, H, I/N] weights with the full routing, every
rank does an equal share of every token's work whatever the router picks, and the MLP's one
all_reduce sums the partial outputs as for a dense MLP. Expert parallelism would need the
routing remapped to local experts and leaves ranks idle when the router favours a few.
With `--enable-expert-parallel` (tp.expert_parallel) it is what the layers do: rank r holds
whole experts [r*E/N, (r+1)*E/N) (expert e on rank e*N//E, as the reference places them),
routing runs over all E on every rank from the replicated router, tokens routed elsewhere
contribute zero on this rank, and the same all_reduce sums the ranks' partial outputs.
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from engine.distributed.group import TensorParallel
from engine.models.decoder_spec import DecoderSpec

FLAG = "--tensor-parallel-size"
EP_FLAG = "--enable-expert-parallel"
_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def shard_spec(spec: DecoderSpec, tp: TensorParallel) -> DecoderSpec:
    """The spec of one rank's layers (heads and intermediate sizes divided); raises
    ValueError naming the flag when the model does not split evenly."""
    n = tp.size
    if n == 1:
        return spec
    _require(spec.num_heads % n == 0, f"{spec.num_heads} attention heads")
    kv_ok = spec.num_kv_heads % n == 0 if spec.num_kv_heads >= n else n % spec.num_kv_heads == 0
    _require(kv_ok, f"{spec.num_kv_heads} KV heads (it must divide them or be a multiple)")
    _require(spec.intermediate_size % n == 0, f"intermediate size {spec.intermediate_size}")
    moe = spec.moe
    if moe is not None and tp.expert_parallel:
        if moe.num_experts % n:
            raise ValueError(f"{EP_FLAG}: {FLAG} {n} does not divide the model's "
                             f"{moe.num_experts} experts")
    elif moe is not None:
        _require(moe.intermediate_size % n == 0,
                 f"expert intermediate size {moe.intermediate_size}")
        moe = replace(moe, intermediate_size=moe.intermediate_size // n)
    return replace(
        spec,
        num_heads=spec.num_heads // n,
        num_kv_heads=max(1, spec.num_kv_heads // n),
        intermediate_size=spec.intermediate_size // n,
        moe=moe,
    )


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{FLAG} does not divide the model's {what}")


def stage_layers(num_layers: int, tp: TensorParallel) -> range:
    """The consecutive layers pipeline stage `tp.stage` holds (the first stages one more
    when they do not split evenly); ValueError naming the flag with fewer layers than
    stages."""
    stages = tp.num_stages
    if num_layers < stages:
        raise ValueError(f"--pipeline-parallel-size {stages} exceeds the model's "
                         f"{num_layers} layers")
    base, extra = divmod(num_layers, stages)
    start = tp.stage * base + min(tp.stage, extra)
    return range(start, start + base + (tp.stage < extra))


def local_experts(num_experts: int, tp: TensorParallel) -> range:
    """The experts this rank holds: all of them (each sliced) without expert parallelism,
    else its contiguous share (shard_spec has checked that N divides them)."""
    if not tp.expert_parallel or tp.size == 1:
        return range(num_experts)
    share = num_experts // tp.size
    return range(tp.rank * share, (tp.rank + 1) * share)


def vocab_shard_size(vocab_size: int, tp: TensorParallel) -> int:
    return -(-vocab_size // tp.size)


class CheckpointSharder:
    """Narrows each checkpoint tensor (HF names, after the family's renames) to this rank's
    slice, in the layout the unsharded loader then fills as usual."""

    def __init__(self, spec: DecoderSpec, tp: TensorParallel) -> None:
        self.spec, self.tp = spec, tp
        self._experts = local_experts(spec.moe.num_experts if spec.moe else 0, tp)

    def keeps(self, name: str) -> bool:
        """Whether this rank's pipeline stage holds the tensor's module at all: its own
        layers; the embedding and LM head live on stage 0 (which samples)."""
        if self.tp.expert_parallel and self.spec.moe is not None:
            match = _PER_EXPERT.search(name)  # another rank's whole expert: never read
            if match is not None and int(match.group(1)) not in self._experts:
                return False
        if self.tp.num_stages == 1:
            return True
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            return index in stage_layers(self.spec.num_layers, self.tp)
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return self.tp.stage == 0
        return True  # the final norm: tiny, every stage holds it

    def narrow(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return tensor
        module, _, kind = name.rpartition(".")
        if ".experts." in name or module.endswith(".experts"):
            return self._expert(name, tensor)
        if module.endswith(("embed_tokens", "lm_head")):
            return self._vocab_rows(tensor)
        if module.endswith(_ROW_PARALLEL):
            if kind == "bias":  # added once, after the all_reduce sums the ranks' parts
                return tensor if self.tp.rank == 0 else torch.zeros_like(tensor)
            return self._even(tensor, dim=-1)
        if module.endswith("self_attn.q_proj"):
            return self._even(tensor, dim=0)
        if module.endswith(("self_attn.k_proj", "self_attn.v_proj")):
            return self._kv_rows(tensor)
        if module.endswith("self_attn.qkv_proj"):  # Phi-3: stored fused [q | k | v]
            q_rows = self.spec.num_heads * self.spec.head_dim
            kv_rows = self.spec.num_kv_heads * self.spec.head_dim
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            return torch.cat([self._even(q, dim=0), self._kv_rows(k), self._kv_rows(v)])
        if module.endswith(("mlp.gate_proj", "mlp.up_proj")):
            return self._even(tensor, dim=0)
        if module.endswith("mlp.gate_up_proj"):  # Phi-3: stored fused [gate | up]
            return self._gate_up(tensor, dim=0)
        return tensor  # norms, the router: every rank holds them whole

    def lora_factors(self, projection: str, index: int, a: torch.Tensor,
                     b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of one adapter slice (A [r, in], B [out, r]), as the base
        projection is split: column-parallel (qkv, gate_up) keep A whole and B's rows of the
        rank's outputs; row-parallel (o, down) keep A's columns of the rank's inputs and B
        whole: each rank's partial update is then summed by the all_reduce that already
        follows the projection (linear in the shrink, so no collective of its own)."""
        if self.tp.size == 1:
            return a, b
        if projection in ("self_attn.o_proj", "mlp.down_proj"):
            return self._even(a, dim=-1).contiguous(), b
        if projection == "self_attn.qkv_proj" and index > 0:
            return a, self._kv_rows(b).contiguous()
        return a, self._even(b, dim=0).contiguous()  # q, gate, up: an even share of rows

    def _expert(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.tp.expert_parallel:
            if _PER_EXPERT.search(name) is not None:
                return tensor  # keeps() already dropped the other ranks' experts
            local = self._experts  # fused [E, ...]: this rank's rows of the expert dim
            return tensor.narrow(0, local.start, len(local))
        if name.endswith(("down_proj.weight", "w2.weight", "experts.down_proj")):
            return self._even(tensor, dim=-1)  # [.., H, I]: the intermediate columns
        if name.endswith(("gate_up_proj", "gate_up_proj.weight")):
            return self._gate_up(tensor, dim=-2)  # [.., 2I, H]
        return self._even(tensor, dim=-2)  # one expert's gate / up [I, H]

    def _even(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        size = tensor.shape[dim] // self.tp.size
        return tensor.narrow(dim, self.tp.rank * size, size)

    def _gate_up(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        gate, up = tensor.chunk(2, dim=dim)
        return torch.cat([self._even(gate, dim), self._even(up, dim)], dim=dim)

    def _kv_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        num_kv, n = self.spec.num_kv_heads, self.tp.size
        if num_kv >= n:
            return self._even(tensor, dim=0)
        # Fewer KV heads than ranks: the one KV head this rank's q heads read.
        head = self.tp.rank // (n // num_kv)
        head_dim = tensor.shape[0] // num_kv
        return tensor.narrow(0, head * head_dim, head_dim)

    def _vocab_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        rows = vocab_shard_size(tensor.shape[0], self.tp)
        start = self.tp.rank * rows
        part = tensor[start : start + rows]
        if part.shape[0] == rows:
            return part
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))  # the last rank's short slice
        padded[: part.shape[0]] = part
        return padded
