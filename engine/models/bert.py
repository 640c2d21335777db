"""BERT-family encoders (BertModel checkpoints such as sentence-transformers' MiniLM): our own
forward pass over a flattened batch of whole sequences, no KV cache.

    input_ids [T] = [ s0 s0 s0 | s1 s1 | s2 s2 s2 s2 ]   (seq_lens [3, 2, 4])
    embeddings:  word[id] + position[pos + offset] + token_type[type] -> LayerNorm
    each layer:  x = LN(x + O(attn(QKV(x))));  x = LN(x + Down(gelu(Up(x))))   (post-norm)

Attention is bidirectional within each sequence and never crosses sequences: the rows are
scattered into a padded [B, heads, L_max, D] batch with a key-padding mask for one SDPA call,
then gathered back. q/k/v are fused into one projection at load time (one GEMM instead of 3).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.layers.linear import Embedding, Linear
from engine.models.weights import FusedWeightLoader

# Checkpoint tensors we never use: the precomputed position-id / token-type buffers.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclass(frozen=True)
class BertDims:
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    # Read by the loader and runners, which also size KV caches for decoders.
    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> BertDims:
        act = getattr(hf_config, "hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"unsupported hidden_act {act!r} (only 'gelu')")
        kind = getattr(hf_config, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"unsupported position_embedding_type {kind!r} (only 'absolute')")
        return cls(
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            head_dim=hf_config.hidden_size // hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            vocab_size=hf_config.vocab_size,
            max_positions=hf_config.max_position_embeddings,
            type_vocab_size=getattr(hf_config, "type_vocab_size", 2),
            layer_norm_eps=hf_config.layer_norm_eps,
        )


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        def param() -> nn.Parameter:
            return nn.Parameter(torch.empty(size, dtype=dtype, device=device), requires_grad=False)

        self.weight = param()
        self.bias = param()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True, slots=True)
class VarlenLayout:
    """Where each flattened row sits in the padded [B, L_max] batch; built once per forward
    and shared by every layer."""

    gather_index: torch.Tensor  # [B * L_max] int64: row of T for each padded slot (0 = pad)
    valid_slots: torch.Tensor  # [T] int64: padded slot of each row of T, in order
    key_mask: torch.Tensor  # [B, 1, 1, L_max] bool: True = a real key
    batch: int
    max_len: int

    @classmethod
    def build(cls, seq_lens: list[int], device: torch.device) -> VarlenLayout:
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        batch, max_len = len(seq_lens), int(lens.max())
        positions = torch.arange(max_len)
        mask = positions[None, :] < lens[:, None]  # [B, L_max]
        starts = torch.cumsum(lens, 0) - lens
        gather = torch.where(mask, starts[:, None] + positions[None, :], 0).reshape(-1)
        valid = torch.nonzero(mask.reshape(-1)).squeeze(1)
        return cls(
            gather.to(device), valid.to(device), mask[:, None, None, :].to(device), batch, max_len
        )


class BertLayer(nn.Module):
    def __init__(self, dims: BertDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, eps = dims.hidden_size, dims.layer_norm_eps
        self.num_heads, self.head_dim = dims.num_heads, dims.head_dim
        # Module names mirror the checkpoint's so weight mapping is just the q/k/v fusion.
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.qkv = Linear(hidden, 3 * hidden, bias=True, dtype=dtype, device=device)
        self.attention.output = nn.Module()
        self.attention.output.dense = Linear(hidden, hidden, bias=True, dtype=dtype, device=device)
        self.attention.output.LayerNorm = LayerNorm(hidden, eps, dtype=dtype, device=device)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(
            hidden, dims.intermediate_size, bias=True, dtype=dtype, device=device
        )
        self.output = nn.Module()
        self.output.dense = Linear(
            dims.intermediate_size, hidden, bias=True, dtype=dtype, device=device
        )
        self.output.LayerNorm = LayerNorm(hidden, eps, dtype=dtype, device=device)

    def forward(self, hidden: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        num_tokens, width = hidden.shape
        qkv = self.attention.self.qkv(hidden)
        # [T, 3*H] -> padded [3, B, heads, L_max, D]
        padded = qkv.index_select(0, layout.gather_index).view(
            layout.batch, layout.max_len, 3, self.num_heads, self.head_dim
        )
        query, key, value = padded.permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.scaled_dot_product_attention(query, key, value, attn_mask=layout.key_mask)
        # Padded query rows attend to real keys only, so they hold finite values; dropped here.
        attn = attn.transpose(1, 2).reshape(layout.batch * layout.max_len, width)
        attn = attn.index_select(0, layout.valid_slots)
        hidden = self.attention.output.LayerNorm(hidden + self.attention.output.dense(attn))
        # BERT's "gelu" is the exact erf form, not the tanh approximation.
        up = F.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(hidden + self.output.dense(up))


class BertModel(nn.Module):
    """Encoder only; parameter names mirror the checkpoint's (`encoder.layer.N...`)."""

    is_encoder = True
    # BertFor* checkpoints nest the encoder under "bert."; BertModel ones do not.
    checkpoint_prefix = "bert."
    # Checkpoint tensors an embedding model never uses: the NSP/classification pooler
    # (sentence embeddings pool the hidden states themselves) and the MLM head.
    ignored_prefixes: tuple[str, ...] = ("pooler.", "cls.")

    @staticmethod
    def position_offset(hf_config: Any) -> int:
        """Row of the position table that token 0 reads (RoBERTa starts past padding_idx)."""
        del hf_config
        return 0

    def __init__(
        self,
        hf_config: Any,
        *,
        attn_backend: object = None,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """`attn_backend` is unused: encoders attend within the batch, without a paged cache."""
        super().__init__()
        del attn_backend, max_positions
        self.dims = dims = BertDims.from_hf_config(hf_config)
        self.first_position = self.position_offset(hf_config)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = Embedding(
            dims.vocab_size, dims.hidden_size, dtype=dtype, device=device
        )
        self.embeddings.position_embeddings = Embedding(
            dims.max_positions, dims.hidden_size, dtype=dtype, device=device
        )
        self.embeddings.token_type_embeddings = Embedding(
            dims.type_vocab_size, dims.hidden_size, dtype=dtype, device=device
        )
        self.embeddings.LayerNorm = LayerNorm(
            dims.hidden_size, dims.layer_norm_eps, dtype=dtype, device=device
        )
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(dims, dtype, device) for _ in range(dims.num_layers)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] of whole sequences laid end to end -> hidden [T, H].
        token_type_ids [T] (segment of each token, for sentence pairs); None = all 0."""
        emb = self.embeddings
        # One-type models (RoBERTa) read row 0 whatever segments a tokenizer reported.
        token_types = (
            emb.token_type_embeddings.weight[0]
            if token_type_ids is None or self.dims.type_vocab_size == 1
            else emb.token_type_embeddings(token_type_ids)
        )
        hidden = (
            emb.word_embeddings(input_ids)
            + emb.position_embeddings(positions + self.first_position)
            + token_types
        )
        hidden = emb.LayerNorm(hidden)
        layout = VarlenLayout.build(seq_lens, hidden.device)
        for layer in self.encoder.layer:
            hidden = layer(hidden, layout)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        hidden = self.dims.hidden_size
        loader = FusedWeightLoader(
            dict(self.named_parameters()),
            fused_shards={
                "attention.self.query": ("attention.self.qkv", 0, hidden),
                "attention.self.key": ("attention.self.qkv", hidden, hidden),
                "attention.self.value": ("attention.self.qkv", 2 * hidden, hidden),
            },
            ignored_suffixes=_IGNORED_SUFFIXES,
        )
        for name, tensor in weights:
            name = name.removeprefix(self.checkpoint_prefix)
            if name.startswith(self.ignored_prefixes):
                continue
            loader.load(name, tensor)
        loader.check_complete()
