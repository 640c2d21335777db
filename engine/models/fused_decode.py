"""Pure-decode steps of a bfloat16 Llama-shaped model on the CPU in one native call.

At batch 1 the Python between a layer's kernels (module calls, views, output allocation, ten
dispatches) costs ~8% of the step; `ops.decode_layers_bf16` runs the same kernels in the same
order from C++. It applies where every piece it replaces would have run our kernels anyway:
bfloat16 on the CPU with the native ops built, every projection packed in panels, the paged
ops attention backend, and a step whose rows are all single-token decodes. Anything else
(prefill rows, float32, the torch backend) takes the per-op path, which stays the reference.
"""
from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.attention.backend import AttentionMetadata
from engine.attention.cpu_backend import PagedOpsAttentionBackend


class FusedDecodeLayers:
    # `model` is a models/decoder.py DecoderForCausalLM (its `dims`, `model.layers`,
    # `model.norm`); typed as a plain module because decoder.py builds this class.
    def __init__(self, model: nn.Module) -> None:
        self.layers: list[tuple[torch.Tensor | None, ...]] | None = _layer_tensors(model)
        dims = model.dims
        self.num_heads, self.num_kv_heads = dims.num_heads, dims.num_kv_heads
        self.intermediate = dims.intermediate_size
        first = model.model.layers[0]
        self.eps = first.input_layernorm.eps
        self.scale = first.self_attn.scale

    def applies(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> bool:
        return (
            self.layers is not None
            and not metadata.prefills
            and metadata.num_decode_tokens == hidden.shape[0]
            and metadata.decode_block_tables is not None
            and metadata.decode_context_lens is not None
        )

    def run(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        kv_caches: list[torch.Tensor],
        metadata: AttentionMetadata,
    ) -> None:
        """Every decoder layer over `hidden` [T, hidden_size], in place."""
        assert self.layers is not None
        rows = hidden.shape[0]
        ops.decode_layers_bf16(
            hidden,
            [(*layer, cache) for layer, cache in zip(self.layers, kv_caches, strict=True)],
            cos.reshape(rows, -1).contiguous(),
            signed_sin.reshape(rows, -1).contiguous(),
            metadata.slot_mapping,
            metadata.decode_block_tables,  # type: ignore[arg-type]
            metadata.decode_context_lens,  # type: ignore[arg-type]
            self.num_heads,
            self.num_kv_heads,
            self.intermediate,
            self.eps,
            self.scale,
        )


def _layer_tensors(model: nn.Module) -> list[tuple[torch.Tensor | None, ...]] | None:
    """Per layer (input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, gate_up_bias, down,
    down_bias), or None where the fused path does not apply to this model."""
    # The kernel implements the base Llama layer only, rotating whole heads.
    if not model.dims.is_plain_llama or any(
        rotary.rotary_dim != model.dims.head_dim for rotary in model.rotary.values()
    ):
        return None
    norm = model.model.norm.weight
    if norm.dtype != torch.bfloat16 or norm.device.type != "cpu" or not ops.decode_layers_available():
        return None
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not isinstance(attn.attn_backend, PagedOpsAttentionBackend) or any(
            linear.packing != "panels" for linear in projections
        ):
            return None
        if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
            return None
        qkv, o, gate_up, down = projections
        layers.append((
            layer.input_layernorm.weight, qkv.packed_weight, qkv.bias, o.packed_weight, o.bias,
            layer.post_attention_layernorm.weight, gate_up.packed_weight, gate_up.bias,
            down.packed_weight, down.bias,
        ))
    return layers
