"""Temperature scaling for sampled rows (greedy rows never reach this transform)."""
from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Divide row i by `temperatures[i]`; every temperature must be > 0."""
    return logits / temperatures.unsqueeze(-1)
