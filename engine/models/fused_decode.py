"""Pure-decode steps of a bfloat16 decoder on the CPU in one native call.

At batch 1 the Python between a layer's kernels (module calls, views, output allocation, ten
dispatches; more for Gemma's four norms, Qwen3's q/k norms and MoE routing) costs a large part
of the step; `ops.decode_layers_bf16` runs the same kernels in the same order from C++. It
applies where every piece it replaces would have run our kernels anyway: bfloat16 on the CPU
with the native ops built, every projection packed in bf16 panels or as linear_int's int8 /
int4 panels (QuantizedLinear "int_panels" without act order: the layers call linear_int where
its forward would), router and experts in bf16 panels, the paged ops attention backend, and a
step whose rows are all single-token decodes. Anything else (prefill rows, float32, the torch
backend) takes the per-op path, which stays the reference.

Every family's switches (engine/models/decoder_spec.py) go along: per-head q/k norms, Gemma's
(1 + w) and sandwich norms, GeGLU, the attention soft-cap, each layer's window, RoPE table and
KV cache group, Granite's residual multiplier, and mixture-of-experts MLPs (router GEMM,
native routing, the fused-experts kernel). Partial rotary dims keep the per-op path.

Steps with LoRA adapter rows stay on this path where the adapters take the native kernel
(layers/lora.py): each layer's stacked factors and the step's row -> slot map go along, and
the kernel adds the adapters after each projection exactly where LoRALinear does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine import ops
from engine.attention.backend import AttentionMetadata
from engine.attention.cpu_backend import PagedOpsAttentionBackend
from engine.layers.lora import LoRALinear, LoRAStep
from engine.layers.quant.panels import dequantize_first
from engine.layers.quantized_linear import QuantizedLinear

# Per layer, (lora_a, lora_b_t, ranks) of qkv, o, gate_up, down (decode_layers.cpp's order).
LayerAdapters = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Weights = tuple[torch.Tensor | None, ...]
# A projection's `bits` in decode_bindings.cpp's formats: bf16 panels, not an int weight.
BF16_PANELS = 16


class FusedDecodeLayers:
    # `model` is a models/decoder.py DecoderForCausalLM (its `dims`, `rotary`, `model.layers`,
    # `model.norm`); typed as a plain module because decoder.py builds this class.
    def __init__(self, model: nn.Module) -> None:
        layers, formats = _layer_tensors(model)
        self.layers: list[tuple[Weights, Weights]] | None = layers
        self.formats = formats
        # From DEQUANTIZE_ROWS rows where linear_int has no AMX prefill, the per-op path
        # multiplies a dequantized bf16 copy of an int8 / int4 weight; such steps stay per-op
        # so that both paths run the same kernels.
        self.int_weights = any(bits != BF16_PANELS for layer in formats for bits, _ in layer)
        spec = model.dims
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.intermediate = spec.intermediate_size
        self.eps = spec.rms_norm_eps
        self.scale = spec.scale
        self.rope_keys = list(model.rotary)
        self.options = [
            (window or 0, self.rope_keys.index(rope))
            for window, rope in zip(spec.layer_windows, spec.layer_rope, strict=True)
        ]
        moe = spec.moe
        self.family = (
            spec.gemma_norm, spec.activation == "gelu_tanh", spec.attn_soft_cap or 0.0,
            spec.residual_multiplier, moe.top_k if moe else 0,
            moe.intermediate_size if moe else 0, moe.renormalize if moe else False,
            moe.float32_weights if moe else False,
        )
        # Only where the fused path applies, and only for dense MLPs (experts take no LoRA).
        self.adapters, self.max_lora_rank = (
            _layer_adapters(model) if layers is not None else (None, 0))

    def takes(self, lora_step: LoRAStep | None) -> bool:
        """Whether a step with this LoRA mapping (None: base model only) can run here."""
        return lora_step is None or (
            self.adapters is not None and lora_step.row_slots is not None)

    def applies(self, hidden: torch.Tensor, metadata: Sequence[AttentionMetadata]) -> bool:
        """`metadata`: each layer's (KV cache groups give layers different block tables)."""
        if self.layers is None:
            return False
        if self.int_weights and dequantize_first(hidden, hidden.shape[1]):
            return False
        for group in {id(m): m for m in metadata}.values():
            if (group.prefills or group.num_decode_tokens != hidden.shape[0]
                    or group.decode_block_tables is None or group.decode_context_lens is None):
                return False
        return True

    def run(
        self,
        hidden: torch.Tensor,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        kv_caches: list[torch.Tensor],
        metadata: Sequence[AttentionMetadata],
        lora_step: LoRAStep | None = None,
    ) -> None:
        """Every decoder layer over `hidden` [T, hidden_size], in place; `rope`: each RoPE
        table's (cos, signed_sin) rows; with `lora_step` (where `takes` it) each row's adapter."""
        assert self.layers is not None
        rows = hidden.shape[0]
        lora = None
        if lora_step is not None:
            lora = (lora_step.row_slots, self.adapters, self.max_lora_rank)
        tables = [
            (rope[key][0].reshape(rows, -1).contiguous(),
             rope[key][1].reshape(rows, -1).contiguous())
            for key in self.rope_keys
        ]
        ops.decode_layers_bf16(
            hidden,
            [
                [*head, cache, *tail, layer_md.slot_mapping, layer_md.decode_block_tables]
                for (head, tail), cache, layer_md in zip(self.layers, kv_caches, metadata,
                                                         strict=True)
            ],
            self.options,
            self.formats,
            tables,
            metadata[0].decode_context_lens,
            self.num_heads,
            self.num_kv_heads,
            self.intermediate,
            self.eps,
            self.scale,
            self.family,
            lora,
        )


def _layer_adapters(model: nn.Module) -> tuple[list[LayerAdapters] | None, int]:
    """Every layer's LoRA slots and their max rank, or (None, 0) where the projections have no
    adapter slots or those take the torch path."""
    adapters: list[LayerAdapters] = []
    max_rank = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.qkv_proj, attn.o_proj, getattr(mlp, "gate_up_proj", None),
                       getattr(mlp, "down_proj", None))
        if not all(isinstance(p, LoRALinear) and p.native for p in projections):
            return None, 0
        adapters.append([(p.lora_a, p.lora_b_t, p.ranks) for p in projections])
        max_rank = projections[0].max_rank
    return adapters, max_rank


def _projection(linear: nn.Module) -> tuple[Weights, Weights, tuple[int, int]] | None:
    """A projection as decode_bindings.cpp takes it: (weight, bias), (scales, offsets) and
    (bits, group_size); bf16 panels are (packed, bias), (None, None), (16, 0). None where it
    has neither layout (the torch path, act-order int weights, K-quants, W8A8)."""
    base = linear.base if isinstance(linear, LoRALinear) else linear
    if getattr(base, "packing", None) == "panels":
        return (base.packed_weight, base.bias), (None, None), (BF16_PANELS, 0)
    if isinstance(base, QuantizedLinear) and base.packing == "int_panels" and (
            base.input_perm is None):
        return ((base.panels, base.bias), (base.panel_scales, base.panel_offsets),
                (base.quant.bits, base.group_size))
    return None


def _layer_tensors(
    model: nn.Module,
) -> tuple[list[tuple[Weights, Weights]] | None, list[list[tuple[int, int]]]]:
    """Per layer the weights before and after its KV cache in decode_bindings.cpp's order:
    (input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, gate_up_bias, down, down_bias)
    and (q_norm, k_norm, pre_ff_norm, post_ff_norm, router, experts_gate_up, experts_down,
    then each projection's scales and offsets), and per layer the projections' (bits,
    group_size); (None, []) where the fused path does not apply to this model."""
    # The kernel rotates whole heads.
    spec = model.dims
    if any(rotary.rotary_dim != spec.head_dim for rotary in model.rotary.values()):
        return None, []
    norm = model.model.norm.weight
    if norm.dtype != torch.bfloat16 or norm.device.type != "cpu" or not ops.decode_layers_available():
        return None, []
    layers, formats = [], []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(attn.attn_backend, PagedOpsAttentionBackend):
            return None, []
        # Attention sinks and GPT-OSS's biased, clamped experts have no native decode layer.
        if attn.sinks is not None or not hasattr(mlp, "gate_up_proj") and not hasattr(mlp, "gate"):
            return None, []
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if attn.q_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        if layer.sandwich:
            norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
        if any(n.eps != spec.rms_norm_eps for n in norms):
            return None, []
        experts = getattr(mlp, "experts", None)
        dense_mlp = () if experts is not None else (mlp.gate_up_proj, mlp.down_proj)
        projections = [_projection(p) for p in (attn.qkv_proj, attn.o_proj, *dense_mlp)]
        if any(p is None for p in projections):
            return None, []
        if experts is not None:
            # Experts and router only as bf16 panels (quantized MoE keeps the per-op path).
            # The kernel routes to every expert by global id: an expert-parallel rank's
            # subset keeps the per-op path too (FusedExperts remaps the ids).
            if (experts.packed_gate_up is None or getattr(mlp.gate, "packing", None) != "panels"
                    or experts.num_experts != experts.routing.num_experts):
                return None, []
            absent = ((None, None), (None, None), (BF16_PANELS, 0))
            projections += [absent, absent]
            moe: Weights = (mlp.gate.packed_weight, experts.packed_gate_up, experts.packed_down)
        else:
            moe = (None,) * 3
        (qkv, qkv_q, qkv_f), (o, o_q, o_f), (gate_up, gu_q, gu_f), (down, down_q, down_f) = (
            projections)
        head = (layer.input_layernorm.weight, *qkv, *o, layer.post_attention_layernorm.weight,
                *gate_up, *down)
        qk_norms = ((attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None
                    else (None, None))
        sandwich = ((layer.pre_feedforward_layernorm.weight,
                     layer.post_feedforward_layernorm.weight) if layer.sandwich else (None, None))
        layers.append((head, (*qk_norms, *sandwich, *moe, *qkv_q, *o_q, *gu_q, *down_q)))
        formats.append([qkv_f, o_f, gu_f, down_f])
    return layers, formats
