"""An EAGLE-1 draft head for Llama targets, read from the checkpoint format the reference
server reads (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B):

    config.json   a LlamaConfig (num_hidden_layers 1, the target's hidden and vocab sizes)
    weights       fc.weight [hidden, 2*hidden] (+ fc.bias), layers.N.* Llama decoder layers,
                  optional embed_tokens.weight (else the target's embedding is used); names
                  may carry a `model.` prefix; lm_head.weight and norm.weight are ignored
                  (the target's LM head is shared; EAGLE-1 has no final norm)

For position t the head reads the target's final-norm hidden state h_t and the embedding of
the token after it, x(t+1): x = fc([embed(x(t+1)), h_t]) goes through the decoder layers,
whose first one skips its input norm (EAGLE's layout), and the layers' output o_t, without a
norm, gives the draft logits through the target's LM head (the guess for x(t+2)); o_t also
stands in for h_(t+1) when the head continues on its own guesses.

Rows of several requests run as one batch through every projection; attention reads each
request's own dense KV cache (`DraftKV`), held by the proposer (engine.spec_decode.eagle).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

_FIELD = "speculative config field 'model'"
_LAYER_WEIGHTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass(slots=True)
class DraftKV:
    """One request's keys and values in the head, per layer [kv_heads, capacity, head_dim];
    index i holds position `first_position + i`."""

    first_position: int
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0


@dataclass(frozen=True, slots=True)
class Segment:
    """Consecutive rows of one request: written at cache index `cache.length` onwards."""

    cache: DraftKV
    num_rows: int


class EagleHead:
    def __init__(self, path: str, *, hidden_size: int, vocab_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """Raises ValueError naming the field (or tensor) at fault for a checkpoint that
        does not fit the target."""
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise ValueError(f"{_FIELD}: {path} has no config.json")
        config = AutoConfig.from_pretrained(directory)
        if config.model_type != "llama":
            raise ValueError(f"{_FIELD}: EAGLE heads must be Llama layers (config.json "
                             f"model_type 'llama'), got {config.model_type!r}")
        for name, want in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
            if getattr(config, name) != want:
                raise ValueError(f"{_FIELD}: the head's config.json {name} "
                                 f"{getattr(config, name)} differs from the target's {want}")
        self.dtype, self.device = dtype, device
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads or self.num_heads
        self.head_dim: int = getattr(config, "head_dim", None) or hidden_size // self.num_heads
        self.eps: float = config.rms_norm_eps
        if config.hidden_act != "silu":
            raise ValueError(f"{_FIELD}: hidden_act {config.hidden_act!r} is not supported "
                             "(Llama heads use silu)")
        self.rotary = LlamaRotaryEmbedding(config).to(device)
        weights = _read_weights(directory)
        self.weights = {name: tensor.to(device=device, dtype=dtype)
                        for name, tensor in weights.items()}
        self._check(hidden_size)
        # The head's own embedding if it ships one; else the proposer passes the target's.
        self.embed_tokens: torch.Tensor | None = self.weights.get("embed_tokens.weight")

    def _check(self, hidden: int) -> None:
        weights = self.weights
        fc = weights.get("fc.weight")
        if fc is None:
            raise ValueError(f"{_FIELD}: the checkpoint has no fc.weight (not an EAGLE head)")
        if tuple(fc.shape) != (hidden, 2 * hidden):
            raise ValueError(f"{_FIELD}: fc.weight has shape {tuple(fc.shape)}, expected "
                             f"({hidden}, {2 * hidden}) for the target's hidden size")
        required = [f"layers.{i}.{w}.weight" for i in range(self.num_layers)
                    for w in _LAYER_WEIGHTS]
        required += [f"layers.{i}.post_attention_layernorm.weight"
                     for i in range(self.num_layers)]
        required += [f"layers.{i}.input_layernorm.weight" for i in range(1, self.num_layers)]
        missing = [name for name in required if name not in weights]
        if missing:
            raise ValueError(f"{_FIELD}: the checkpoint lacks {missing[0]}")
        embed = weights.get("embed_tokens.weight")
        if embed is not None and embed.shape[1] != hidden:
            raise ValueError(f"{_FIELD}: embed_tokens.weight has width {embed.shape[1]}, "
                             f"expected the target's hidden size {hidden}")

    def new_cache(self, first_position: int, capacity: int = 64) -> DraftKV:
        shape = (self.num_kv_heads, capacity, self.head_dim)
        return DraftKV(
            first_position,
            [torch.empty(shape, dtype=self.dtype, device=self.device)
             for _ in range(self.num_layers)],
            [torch.empty(shape, dtype=self.dtype, device=self.device)
             for _ in range(self.num_layers)],
        )

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                segments: Sequence[Segment]) -> torch.Tensor:
        """embeds, features [N, hidden] (row t: embed(x(t+1)) and h_t), positions [N] ->
        the head's output o [N, hidden]; each segment's rows are appended to its cache."""
        w = self.weights
        x = _linear(torch.cat((embeds, features), dim=-1), w, "fc")
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0], sin[0]
        for i in range(self.num_layers):
            prefix = f"layers.{i}."
            residual = x
            if i > 0:  # EAGLE's first layer reads fc's output without a norm
                x = _rms_norm(x, w[prefix + "input_layernorm.weight"], self.eps)
            x = residual + self._attention(x, cos, sin, i, segments)
            residual = x
            x = _rms_norm(x, w[prefix + "post_attention_layernorm.weight"], self.eps)
            mlp = F.silu(_linear(x, w, prefix + "mlp.gate_proj")) * _linear(
                x, w, prefix + "mlp.up_proj")
            x = residual + _linear(mlp, w, prefix + "mlp.down_proj")
        for segment in segments:
            segment.cache.length += segment.num_rows
        return x

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                   segments: Sequence[Segment]) -> torch.Tensor:
        w, prefix = self.weights, f"layers.{layer}.self_attn."
        rows, d = x.shape[0], self.head_dim
        q = _rope(_linear(x, w, prefix + "q_proj").view(rows, self.num_heads, d), cos, sin)
        k = _rope(_linear(x, w, prefix + "k_proj").view(rows, self.num_kv_heads, d), cos, sin)
        v = _linear(x, w, prefix + "v_proj").view(rows, self.num_kv_heads, d)
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        row = 0
        for segment in segments:
            cache, m = segment.cache, segment.num_rows
            start = cache.length
            _reserve(cache, layer, start + m)
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:, start : start + m] = k[row : row + m].transpose(0, 1)
            values[:, start : start + m] = v[row : row + m].transpose(0, 1)
            # Row i (cache index start + i) sees the cache up to and including itself.
            visible = torch.arange(start + m, device=x.device)[None, :] <= (
                torch.arange(m, device=x.device)[:, None] + start)
            attended = F.scaled_dot_product_attention(
                q[row : row + m].transpose(0, 1),
                keys[:, : start + m].repeat_interleave(group, dim=0),
                values[:, : start + m].repeat_interleave(group, dim=0),
                attn_mask=visible,
            )
            out[row : row + m] = attended.transpose(0, 1)
            row += m
        return _linear(out.reshape(rows, -1), w, prefix + "o_proj")


def _reserve(cache: DraftKV, layer: int, length: int) -> None:
    """Grow the layer's cache (doubling) to hold `length` positions."""
    capacity = cache.keys[layer].shape[1]
    if length <= capacity:
        return
    new_capacity = max(length, 2 * capacity)
    for tensors in (cache.keys, cache.values):
        old = tensors[layer]
        grown = old.new_empty((old.shape[0], new_capacity, old.shape[2]))
        grown[:, :capacity] = old
        tensors[layer] = grown


def _linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, weights[name + ".weight"], weights.get(name + ".bias"))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    as_float = x.float()
    normed = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, d] rotated by its row's position (the rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, `model.` prefixes dropped."""
    files = sorted(directory.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for file in files:
            tensors.update(load_file(file))
    else:
        bins = sorted(directory.glob("pytorch_model*.bin"))
        if not bins:
            raise ValueError(f"{_FIELD}: {directory} has no *.safetensors or "
                             "pytorch_model.bin weights")
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return {name.removeprefix("model."): tensor for name, tensor in tensors.items()}
