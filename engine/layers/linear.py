"""Linear and embedding layers whose parameters start uninitialised.

Every parameter is overwritten by the checkpoint, so the random initialisation of torch.nn's
layers would only cost start-up time (seconds for billion-parameter models).

On CPU in bfloat16, `prepack_cpu_linears` re-lays each Linear weight out once after loading,
and the plain weight is dropped (never kept twice in memory):
- where our AVX512_BF16 kernel is built (engine.ops.linear_bf16), into its 16-row panels: a
  decode step streams each panel contiguously, ~1.3x faster than oneDNN at 1-8 tokens and
  on par with it from 32 to 256 (benchmarks/linear_kernels.py);
- else into oneDNN's blocked format, ~1.5x faster than F.linear at decode.
Both agree with F.linear to the last bfloat16 bit up to summation order (fp32 accumulation).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine import ops
from engine.layers.moe import prepack_fused_experts


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # Replaces `weight` once prepacked: our kernel's panels, or an opaque oneDNN tensor.
        self.packed_weight: torch.Tensor | None = None
        self.packing: str | None = None  # "panels" | "onednn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing == "panels":
            assert self.packed_weight is not None
            return ops.linear_bf16(x, self.packed_weight, self.bias, self.out_features)
        if self.packing == "onednn":
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def prepack_for_cpu(self, packing: str) -> None:
        assert self.weight is not None
        if packing == "panels":
            self.packed_weight = ops.pack_linear_weight(self.weight.detach())
        else:
            # Batch-size hint 1: the layout suits decode and is no slower for larger batches.
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self.packing = packing
        self.weight = None

    def extra_repr(self) -> str:
        packed = f", packed={self.packing}" if self.packing is not None else ""
        has_bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={has_bias}{packed}"


def prepack_cpu_linears(model: nn.Module) -> str | None:
    """Prepack every Linear of a bfloat16 CPU model; returns the packing used, or None (model
    unchanged) where neither our kernel nor this torch build's oneDNN ops are available."""
    prepack_fused_experts(model)  # mixture-of-experts weights: their own panels (layers/moe.py)
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    if not linears:
        return None
    if ops.linear_bf16_available() and all(m.in_features % 2 == 0 for m in linears):
        packing = "panels"
    elif torch.backends.mkldnn.is_available() and _prepack_works(linears[0]):
        packing = "onednn"
    else:
        return None
    for linear in linears:
        linear.prepack_for_cpu(packing)
    return packing


def _prepack_works(linear: Linear) -> bool:
    """Probe the private oneDNN ops on a tiny weight; they are not part of torch's stable API."""
    assert linear.weight is not None
    probe = torch.zeros(2, 2, dtype=linear.weight.dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(probe, 1)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class Embedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device),
            requires_grad=False,
        )
        # Replaces `weight` once a tied LM head shares the matrix in linear_bf16's panels.
        self.packed_weight: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            # Row r of the matrix is panel r // 16's column r % 16 (pair-interleaved): one
            # gather, the same values F.embedding reads.
            flat = input_ids.reshape(-1)
            rows = self.packed_weight[flat // ops.LINEAR_PANEL_ROWS, :, flat % ops.LINEAR_PANEL_ROWS]
            return rows.reshape(*input_ids.shape, self.embedding_dim)
        assert self.weight is not None
        return F.embedding(input_ids, self.weight)

    def pack_for_tied_head(self) -> torch.Tensor | None:
        """A tied LM head's weight in linear_bf16's panels (bf16 on the CPU with our kernel,
        even width), the plain matrix dropped so it is held once; None (unchanged) elsewhere.
        F.linear over the plain matrix cost a Gemma-shaped decode step ~15%."""
        weight = self.weight
        if (weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
                or self.embedding_dim % 2 or not ops.linear_bf16_available()):
            return None
        self.packed_weight = ops.pack_linear_weight(weight.detach())
        self.weight = None
        return self.packed_weight
