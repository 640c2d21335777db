"""The experts of a sparse mixture-of-experts block (Mixtral, Qwen3-MoE).

The router (a Linear over the hidden state) stays in the model; this module takes its logits.

    routing = MoERouting(num_experts=E, top_k=k, renormalize=..., float32_weights=...)
        Mixtral:   renormalize=True,                   float32_weights=True
        Qwen3-MoE: renormalize=config.norm_topk_prob,  float32_weights=False
    experts = FusedExperts(E, hidden_size, intermediate_size, routing, dtype=..., device=...)
    out = experts(hidden [T, H], router_logits [T, E])                  # -> [T, H]

Routing is transformers 5.x's (MixtralTopKRouter, Qwen3MoeTopKRouter): softmax over all
experts in float32, top-k, optional renormalisation of the k weights; Qwen3-MoE then casts the
weights to the logits' dtype, Mixtral keeps them in float32 (in bfloat16 that changes where
the weighted expert outputs round). The experts' sum follows transformers' default
("grouped_mm") experts forward: per-assignment weighted outputs, summed over k in float32.

Weights: `w13` [E, 2 I, H] (rows: gate then up) and `w2` [E, H, I], as transformers 5.x keeps
them in memory (`mlp.experts.gate_up_proj` / `down_proj`). For each checkpoint tensor of a
layer's block, the model's loader asks `expert_weight_target(name)`; on a match it calls
`load_expert(target.expert, target.projection, tensor)`. Both layouts are recognised:
    per expert (published checkpoints and transformers' save_pretrained):
        ...block_sparse_moe.experts.N.{w1,w3,w2}.weight                     (Mixtral)
        ...mlp.experts.N.{gate_proj,up_proj,down_proj}.weight               (Qwen3-MoE)
    fused (transformers' in-memory state dict): ...experts.gate_up_proj [E, 2 I, H],
        ...experts.down_proj [E, H, I]                                      (expert None)
After loading, `missing_experts()` names every slice no tensor filled (raise on a non-empty
list). On CPU in bfloat16, `prepack()` (run by engine.layers.linear.prepack_cpu_linears
through `prepack_fused_experts`) re-lays the weights out once for our kernel
(csrc/cpu/moe_bf16.cpp, one native call per layer) and drops the plain ones; elsewhere the
grouped torch path below runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from engine import family_ops, ops

# Per-expert projection names -> ours (Mixtral's w1 / w3 / w2 are gate / up / down).
_PROJECTION_ALIASES = {
    "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
    "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj", "gate_up_proj": "gate_up_proj",
}
_PER_EXPERT_NAME = re.compile(
    r"(?:^|\.)experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_FUSED_NAME = re.compile(r"(?:^|\.)experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoERouting:
    num_experts: int
    top_k: int
    renormalize: bool
    # Keep the k routing weights in float32 (Mixtral) instead of casting them to the router
    # logits' dtype (Qwen3-MoE).
    float32_weights: bool = False

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )


class ExpertWeight(NamedTuple):
    expert: int | None  # None: one fused tensor for every expert
    projection: str  # gate_proj | up_proj | down_proj | gate_up_proj


def expert_weight_target(name: str) -> ExpertWeight | None:
    """Which expert slice a checkpoint tensor fills, or None when `name` is not an expert
    weight (the router, attention, norms)."""
    match = _PER_EXPERT_NAME.search(name)
    if match is not None:
        return ExpertWeight(int(match.group(1)), _PROJECTION_ALIASES[match.group(2)])
    match = _FUSED_NAME.search(name)
    if match is not None:
        return ExpertWeight(None, match.group(1))
    return None


def route(router_logits: torch.Tensor, routing: MoERouting) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert ids [T, k] int64), as transformers'."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not routing.float32_weights:
        weights = weights.to(router_logits.dtype)
    return weights, expert_ids


def grouped_experts(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The torch path (any dtype, any device): the T * k assignments sorted by expert, each
    expert's GEMMs over its contiguous rows, weighted outputs summed per token over k."""
    num_tokens, top_k = expert_ids.shape
    flat_ids = expert_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    rows = hidden[order // top_k]
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    expert_out = torch.empty_like(rows)
    start = 0
    for expert in (e for e, count in enumerate(counts) if count):
        end = start + counts[expert]
        gate, up = F.linear(rows[start:end], w13[expert]).chunk(2, dim=-1)
        expert_out[start:end] = F.linear(F.silu(gate) * up, w2[expert])
        start = end
    weighted = expert_out * weights.reshape(-1)[order].unsqueeze(-1)
    per_assignment = torch.empty_like(weighted)
    per_assignment[order] = weighted
    summed = per_assignment.view(num_tokens, top_k, hidden.shape[1]).sum(dim=1)
    return summed.to(hidden.dtype)


class FusedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        routing: MoERouting,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        first_expert: int = 0,
    ) -> None:
        """`num_experts` held here, global ids [first_expert, first_expert + num_experts) of
        the routing's (expert parallelism holds a range; load_expert takes global ids)."""
        super().__init__()
        if first_expert < 0 or first_expert + num_experts > routing.num_experts:
            raise ValueError(
                f"experts [{first_expert}, {first_expert + num_experts}) exceed "
                f"routing.num_experts={routing.num_experts}"
            )
        self.first_expert = first_expert
        sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size}
        for setting, value in sizes.items():
            if value < 1:
                raise ValueError(f"{setting} must be >= 1, got {value}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.routing = routing
        # Overwritten by the checkpoint, so never initialised (as engine.layers.linear).
        gate_up_shape = (num_experts, 2 * intermediate_size, hidden_size)
        self.w13: nn.Parameter | None = nn.Parameter(
            torch.empty(gate_up_shape, dtype=dtype, device=device), requires_grad=False
        )
        self.w2: nn.Parameter | None = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device),
            requires_grad=False,
        )
        self._loaded: set[tuple[int, str]] = set()
        # Replace w13 / w2 once prepacked: moe_bf16's panels.
        self.packed_gate_up: torch.Tensor | None = None
        self.packed_down: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden must be [tokens, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if router_logits.shape != (num_tokens, self.routing.num_experts):
            raise ValueError(
                f"router_logits must be [{num_tokens}, {self.routing.num_experts}], "
                f"got {tuple(router_logits.shape)}"
            )
        routing = self.routing
        if self.packed_gate_up is not None and self.packed_down is not None:
            # Routed natively (as the fused decode layers route); bf16 weights (cast to the
            # logits' dtype) make torch round each weighted output.
            weights, expert_ids = family_ops.moe_route_bf16(
                router_logits, routing.top_k, routing.renormalize, routing.float32_weights)
            weights, expert_ids = self._local(weights, expert_ids)
            return ops.moe_bf16(
                hidden, expert_ids, weights, self.packed_gate_up, self.packed_down,
                self.intermediate_size, round_weighted=not routing.float32_weights,
            )
        weights, expert_ids = self._local(*route(router_logits, routing))
        assert self.w13 is not None and self.w2 is not None
        return grouped_experts(hidden, expert_ids, weights, self.w13, self.w2)

    def _local(
        self, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global routing -> this module's experts: an assignment to an expert held elsewhere
        keeps its row but points at local expert 0 with weight 0, so it adds exactly zero
        (the rank holding that expert adds its share; the all_reduce sums them)."""
        if self.num_experts == self.routing.num_experts:
            return weights, expert_ids
        local = expert_ids - self.first_expert
        held = (local >= 0) & (local < self.num_experts)
        return (torch.where(held, weights, torch.zeros_like(weights)),
                torch.where(held, local, torch.zeros_like(local)))

    def load_expert(self, expert: int | None, projection: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor into its slice: `expert` None for the fused 3-D tensors
        (gate_up_proj [E, 2 I, H], down_proj [E, H, I]), else that expert's gate_proj / w1 and
        up_proj / w3 [I, H], down_proj / w2 [H, I] (or its own gate_up_proj [2 I, H])."""
        if self.w13 is None or self.w2 is None:
            raise RuntimeError("expert weights are already prepacked; load before prepack()")
        name = _PROJECTION_ALIASES.get(projection)
        if name is None:
            raise ValueError(
                f"unknown expert projection {projection!r}; expected one of "
                f"{sorted(_PROJECTION_ALIASES)}"
            )
        if expert is not None:
            if not 0 <= expert - self.first_expert < self.num_experts:
                raise ValueError(f"expert {expert} out of range (experts [{self.first_expert}, "
                                 f"{self.first_expert + self.num_experts}) held here)")
            expert -= self.first_expert
        experts = range(self.num_experts) if expert is None else [expert]
        if expert is None:
            if name not in ("gate_up_proj", "down_proj"):
                raise ValueError(f"{projection} needs an expert index (fused tensors are "
                                 f"gate_up_proj and down_proj)")
            target = self.w13 if name == "gate_up_proj" else self.w2
        else:
            inter = self.intermediate_size
            target = {
                "gate_proj": self.w13[expert, :inter],
                "up_proj": self.w13[expert, inter:],
                "gate_up_proj": self.w13[expert],
                "down_proj": self.w2[expert],
            }[name]
        if tuple(tensor.shape) != tuple(target.shape):
            which = "all experts" if expert is None else f"expert {expert}"
            raise ValueError(
                f"{projection} of {which}: expected shape {tuple(target.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        with torch.no_grad():
            target.copy_(tensor)
        filled = ("gate_proj", "up_proj") if name == "gate_up_proj" else (name,)
        self._loaded.update((e, p) for e in experts for p in filled)

    def missing_experts(self) -> list[str]:
        """`experts.N.<projection>` for every slice no load_expert call has filled."""
        return [
            f"experts.{e + self.first_expert}.{p}"
            for e in range(self.num_experts)
            for p in _PROJECTIONS
            if (e, p) not in self._loaded
        ]

    def prepack(self) -> bool:
        """Re-lay the weights out once for moe_bf16 where it runs (bfloat16 on a CPU with
        AVX512_BF16, even sizes) and drop the plain ones; False (unchanged) elsewhere."""
        if self.packed_gate_up is not None:
            return True
        assert self.w13 is not None and self.w2 is not None
        if (
            self.w13.dtype != torch.bfloat16
            or self.w13.device.type != "cpu"
            or self.hidden_size % 2
            or self.intermediate_size % 2
            or not ops.linear_bf16_available()
        ):
            return False
        self.packed_gate_up = ops.pack_moe_gate_up(self.w13.detach())
        self.packed_down = ops.pack_moe_down(self.w2.detach())
        self.w13 = None
        self.w2 = None
        return True

    def extra_repr(self) -> str:
        r = self.routing
        packed = ", packed=panels" if self.packed_gate_up is not None else ""
        return (
            f"experts={self.num_experts}, top_k={r.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, renormalize={r.renormalize}{packed}"
        )


def prepack_fused_experts(model: nn.Module) -> int:
    """prepack() every FusedExperts of `model`; returns how many now run on moe_bf16."""
    return sum(module.prepack() for module in model.modules() if isinstance(module, FusedExperts))
