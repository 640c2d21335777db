"""Vocab-parallel embedding: each tensor-parallel rank holds rows [start, start + rows) of
the table (engine/distributed/sharding.py). A token id outside them embeds to zeros here; the
all_reduce sums the one rank that holds it with the zeros of all the others."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.distributed.group import TensorParallel
from engine.distributed.sharding import vocab_shard_size


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp: TensorParallel,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.tp = tp
        rows = vocab_shard_size(num_embeddings, tp)
        self.start = tp.rank * rows
        # Named as Embedding's, so loading and the tied LM head read it alike.
        self.weight = nn.Parameter(
            torch.empty(rows, embedding_dim, dtype=dtype, device=device), requires_grad=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(hidden)
