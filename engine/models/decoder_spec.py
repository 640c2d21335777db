"""What distinguishes one decoder-only family from another, read once from the HF config.

Every generative family we serve is a pre-norm transformer decoder with rotary attention and
a gated MLP (or a mixture of gated experts); the families differ in a handful of switches
and constants. `DecoderSpec` is those switches, so one implementation (models/decoder.py)
serves them all and a new family is mostly a new reader below:

    llama / mistral / qwen2   the base shape (qwen2: q/k/v biases)
    qwen3, qwen3_moe          per-head q/k RMSNorm before RoPE (qwen3_moe: experts)
    mixtral                   experts, top-2, always renormalised
    gemma2, gemma3_text       (1 + w) RMSNorm in float32, norms before and after attention and
                              MLP, GeGLU, sqrt(hidden) embedding scale, query_pre_attn_scalar,
                              soft-capping (gemma2), alternating sliding-window layers,
                              q/k norm and a separate local RoPE table (gemma3)
    phi3                      checkpoint already fused (qkv_proj, gate_up_proj), LongRoPE
    granite                   embedding / residual / attention / logit multipliers
    gpt_oss                   attention sinks, alternating sliding-window layers, YaRN, q/k/v/o
                              biases, biased router with a softmax over the top-k logits,
                              biased experts with a clamped SwiGLU (models/gpt_oss_layers.py)
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

# Per-layer attention kinds as transformers names them in `config.layer_types`.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    renormalize: bool
    intermediate_size: int
    # Layers whose MLP is a mixture of experts (the others keep a dense MLP).
    sparse_layers: frozenset[int]
    # Mixtral keeps the routing weights in float32; Qwen3-MoE rounds them to the dtype.
    float32_weights: bool = False
    # GPT-OSS: router with a bias, softmax over the top-k logits, biased experts in the
    # checkpoint's [E, in, out] layout with gate/up interleaved and a clamped SwiGLU.
    gpt_oss: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0


@dataclass(frozen=True)
class DecoderSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Gemma's RMSNorm: scale by (1 + w) in float32, then round (Llama rounds, then scales).
    gemma_norm: bool = False
    # Norms after attention and around the MLP as well (Gemma 2/3's "sandwich").
    sandwich_norms: bool = False
    # "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    activation: str = "silu"
    embed_scale: float = 1.0
    # Gemma multiplies by the scale rounded to the activations' dtype; Granite by the float.
    embed_scale_in_dtype: bool = False
    residual_multiplier: float = 1.0
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    logits_divisor: float = 1.0
    # Per layer: its attention window in tokens (None: full causal attention) ...
    layer_windows: tuple[int | None, ...] = ()
    # ... and which RoPE table it reads (Gemma 3's local layers use their own base).
    layer_rope: tuple[str, ...] = ()
    moe: MoESpec | None = None
    # A learned per-head logit in every softmax denominator (GPT-OSS's attention sinks).
    attn_sinks: bool = False
    # RMSNorm that scales by the weight in float32 before rounding (GPT-OSS; Llama rounds
    # first).
    norm_scale_in_float32: bool = False
    # Checkpoint module prefixes renamed to ours on load (Mixtral's block_sparse_moe -> mlp).
    renames: tuple[tuple[str, str], ...] = field(default=())

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def rope_config(self, hf_config: Any, rope_key: str) -> Any:
        """The config whose RoPE settings one table is built from. Gemma 3 keeps one set of
        `rope_parameters` per layer type; every other family has one set for all layers."""
        params = getattr(hf_config, "rope_parameters", None)
        if isinstance(params, dict) and rope_key in params and isinstance(params[rope_key], dict):
            view = copy.copy(hf_config)
            view.rope_parameters = params[rope_key]
            return view
        return hf_config


def read_decoder_spec(hf_config: Any) -> DecoderSpec:
    """The spec of any supported decoder; raises ValueError for a config variant we cannot
    serve exactly (the loader turns it into a start-up error)."""
    model_type = str(getattr(hf_config, "model_type", ""))
    spec = _base_spec(hf_config)
    family = _FAMILIES.get(model_type)
    return family(hf_config, spec) if family is not None else spec


def _base_spec(cfg: Any) -> DecoderSpec:
    num_heads = cfg.num_attention_heads
    num_layers = cfg.num_hidden_layers
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    windows = _layer_windows(cfg, num_layers)
    return DecoderSpec(
        hidden_size=cfg.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
        intermediate_size=cfg.intermediate_size,
        num_layers=num_layers,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        layer_windows=windows,
        layer_rope=tuple("default" for _ in range(num_layers)),
    )


def _layer_windows(cfg: Any, num_layers: int) -> tuple[int | None, ...]:
    """`layer_types` when the config has them (Qwen2/3 with max_window_layers, Gemma), else
    one window for every layer (Mistral, Phi-3) or none."""
    window = getattr(cfg, "sliding_window", None)
    # Qwen2/3 keep a sliding_window value that only applies with use_sliding_window.
    if window is not None and not getattr(cfg, "use_sliding_window", True):
        window = None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        if len(layer_types) < num_layers:
            raise ValueError(f"layer_types names {len(layer_types)} of {num_layers} layers")
        return tuple(
            int(window) if kind == SLIDING_ATTENTION and window is not None else None
            for kind in layer_types[:num_layers]
        )
    return tuple(None if window is None else int(window) for _ in range(num_layers))


def _qwen2(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    # Qwen2 always has q/k/v biases and none on o_proj.
    return replace(spec, qkv_bias=True, o_bias=False)


def _qwen3(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    return replace(spec, qk_norm=True)


def _qwen3_moe(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    dense_only = set(getattr(cfg, "mlp_only_layers", None) or ())
    num_experts = int(cfg.num_experts)
    sparse = frozenset(
        i for i in range(spec.num_layers)
        if i not in dense_only and num_experts > 0 and (i + 1) % step == 0
    )
    moe = MoESpec(
        num_experts=num_experts,
        top_k=int(cfg.num_experts_per_tok),
        renormalize=bool(getattr(cfg, "norm_topk_prob", False)),
        intermediate_size=int(cfg.moe_intermediate_size),
        sparse_layers=sparse,
    )
    return replace(spec, qk_norm=True, moe=moe)


def _mixtral(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    moe = MoESpec(
        num_experts=int(cfg.num_local_experts),
        top_k=int(cfg.num_experts_per_tok),
        renormalize=True,
        intermediate_size=int(cfg.intermediate_size),
        sparse_layers=frozenset(range(spec.num_layers)),
        float32_weights=True,
    )
    return replace(spec, moe=moe, renames=((".block_sparse_moe.", ".mlp."),))


def _gemma_common(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    activation = str(getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"unsupported hidden_activation {activation!r} (gelu_pytorch_tanh only)")
    return replace(
        spec,
        gemma_norm=True,
        sandwich_norms=True,
        activation="gelu_tanh",
        embed_scale=float(cfg.hidden_size) ** 0.5,
        embed_scale_in_dtype=True,
        attn_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        attn_soft_cap=_optional_float(getattr(cfg, "attn_logit_softcapping", None)),
        final_logit_soft_cap=_optional_float(getattr(cfg, "final_logit_softcapping", None)),
        # Gemma checkpoints tie the LM head to the embedding.
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def _gemma3(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    spec = _gemma_common(cfg, spec)
    params = getattr(cfg, "rope_parameters", None)
    per_type = isinstance(params, dict) and SLIDING_ATTENTION in params
    layer_types = list(getattr(cfg, "layer_types", None) or [FULL_ATTENTION] * spec.num_layers)
    rope = tuple(kind if per_type else "default" for kind in layer_types[: spec.num_layers])
    return replace(spec, qk_norm=True, layer_rope=rope)


def _granite(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    return replace(
        spec,
        embed_scale=float(cfg.embedding_multiplier),
        residual_multiplier=float(cfg.residual_multiplier),
        attn_scale=float(cfg.attention_multiplier),
        logits_divisor=float(cfg.logits_scaling),
    )


def _gpt_oss(cfg: Any, spec: DecoderSpec) -> DecoderSpec:
    if getattr(cfg, "quantization_config", None):
        # The released checkpoints store experts as MXFP4 blocks; only dense bf16 / float32
        # checkpoints load exactly here.
        raise ValueError("gpt_oss: quantization_config (MXFP4 experts) is not supported; "
                         "serve a dequantized bf16 or float32 checkpoint")
    moe = MoESpec(
        num_experts=int(cfg.num_local_experts),
        top_k=int(cfg.num_experts_per_tok),
        renormalize=True,
        intermediate_size=int(cfg.intermediate_size),
        sparse_layers=frozenset(range(spec.num_layers)),
        gpt_oss=True,
        swiglu_alpha=float(getattr(cfg, "swiglu_alpha", 1.702)),
        swiglu_limit=float(cfg.swiglu_limit),
    )
    return replace(spec, moe=moe, attn_sinks=True, norm_scale_in_float32=True)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


_FAMILIES: dict[str, Callable[[Any, DecoderSpec], DecoderSpec]] = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "gemma2": _gemma_common,
    "gemma3_text": _gemma3,
    "granite": _granite,
    "gpt_oss": _gpt_oss,
}
