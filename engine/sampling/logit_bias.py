"""Per-request additive logit bias (OpenAI `logit_bias`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling_params import SamplingParams


def needs_logit_bias(params: SamplingParams) -> bool:
    return bool(params.logit_bias)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Return `logits` with each row's bias added; `params[i]` belongs to row i.

    Token ids outside [0, vocab) are ignored: they can never be sampled, and one bad entry
    must not fail the whole batch. The input tensor is not modified.
    """
    vocab_size = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for row, row_params in enumerate(params):
        for token_id, bias in row_params.logit_bias.items():
            if 0 <= token_id < vocab_size:
                row_ids.append(row)
                token_ids.append(token_id)
                biases.append(bias)
    if not row_ids:
        return logits
    device = logits.device
    index = (
        torch.tensor(row_ids, dtype=torch.long, device=device),
        torch.tensor(token_ids, dtype=torch.long, device=device),
    )
    values = torch.tensor(biases, dtype=logits.dtype, device=device)
    return logits.index_put(index, values, accumulate=True)
