"""Linear and embedding layers whose parameters start uninitialised.

Every parameter is overwritten by the checkpoint, so the random initialisation of torch.nn's
layers would only cost start-up time (seconds for billion-parameter models).

On CPU in bfloat16, `prepack_cpu_linears` re-lays each Linear weight out in oneDNN's blocked
format once after loading: decode matmuls then run about 1.5x faster than F.linear with
bit-identical results. The plain weight is dropped (not kept twice in memory).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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
        # An opaque oneDNN tensor replacing `weight` once prepacked.
        self.packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def prepack_for_cpu(self) -> None:
        assert self.weight is not None
        # Batch-size hint 1: the layout suits decode and is no slower for larger batches.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self.weight = None

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed_weight is not None else ""
        has_bias = self.bias is not None
        return f"in={self.in_features}, out={self.out_features}, bias={has_bias}{packed}"


def prepack_cpu_linears(model: nn.Module) -> bool:
    """Prepack every Linear of a bfloat16 CPU model for oneDNN; False (model unchanged) where
    this torch build lacks the ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    if not linears or not _prepack_works(linears[0]):
        return False
    for linear in linears:
        linear.prepack_for_cpu()
    return True


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
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device),
            requires_grad=False,
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
