"""Pure-decode steps of a bfloat16 Llama-shaped model on the CPU in one native call.

At batch 1 the Python between a layer's kernels (module calls, views, output allocation, ten
dispatches) costs ~8% of the step; `ops.decode_layers_bf16` runs the same kernels in the same
order from C++. It applies where every piece it replaces would have run our kernels anyway:
bfloat16 on the CPU with the native ops built, every projection packed in panels, the paged
ops attention backend, and a step whose rows are all single-token decodes. Anything else
(prefill rows, float32, the torch backend) takes the per-op path, which stays the reference.

Steps with LoRA adapter rows stay on this path where the adapters take the native kernel
(layers/lora.py): each layer's stacked factors and the step's row -> slot map go along, and
the kernel adds the adapters after each projection exactly where LoRALinear does.
"""
from __future__ import annotations

import torch
from torch import nn

from engine import ops
from engine.attention.backend import AttentionMetadata
from engine.attention.cpu_backend import PagedOpsAttentionBackend
from engine.layers.lora import LoRALinear, LoRAStep

# Per layer, (lora_a, lora_b_t, ranks) of qkv, o, gate_up, down (decode_layers.cpp's order).
LayerAdapters = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
        # Only where the fused path applies: other layers (MoE MLPs) have no gate_up_proj.
        self.adapters, self.max_lora_rank = (
            _layer_adapters(model) if self.layers is not None else (None, 0))

    def takes(self, lora_step: LoRAStep | None) -> bool:
        """Whether a step with this LoRA mapping (None: base model only) can run here."""
        return lora_step is None or (
            self.adapters is not None and lora_step.row_slots is not None)

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
        lora_step: LoRAStep | None = None,
    ) -> None:
        """Every decoder layer over `hidden` [T, hidden_size], in place; with `lora_step`
        (where `takes` it) each row's adapter too."""
        assert self.layers is not None
        rows = hidden.shape[0]
        lora = None
        if lora_step is not None:
            lora = (lora_step.row_slots, self.adapters, self.max_lora_rank)
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
            lora,
        )


def _layer_adapters(model: nn.Module) -> tuple[list[LayerAdapters] | None, int]:
    """Every layer's LoRA slots and their max rank, or (None, 0) where the projections have no
    adapter slots or those take the torch path."""
    adapters: list[LayerAdapters] = []
    max_rank = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(p, LoRALinear) and p.native for p in projections):
            return None, 0
        adapters.append([(p.lora_a, p.lora_b_t, p.ranks) for p in projections])
        max_rank = projections[0].max_rank
    return adapters, max_rank


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
