"""Tiny transformers configs of every decoder family we serve, each with its family's real
shape quirks switched on (so a forward pass that ignores one is visibly off), shared by the
logit-level tests (tests/engine/models) and the whole-engine greedy tests."""
from __future__ import annotations

from typing import Any

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

# Small enough that prompts of a few dozen tokens cross it: layers with a window attend to
# fewer keys than full layers within the tests' prompt lengths.
TEST_WINDOW = 8
SLIDING, FULL = "sliding_attention", "full_attention"

FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3",
    "granite", "gpt_oss",
)
# Families whose layers attend through a sliding window in these configs.
WINDOWED = ("mistral_window", "gemma2", "gemma3", "gpt_oss")


def family_config(family: str, **common: Any) -> PretrainedConfig:
    """`common` carries the sizes (vocab_size, hidden_size, num_hidden_layers >= 2, heads,
    max_position_embeddings, ...); each family adds its quirks."""
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "mistral_window":
        return MistralConfig(**common, sliding_window=TEST_WINDOW)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        # head_dim set apart from hidden / heads, as in the real Qwen3 checkpoints.
        return Qwen3Config(**{**common, "head_dim": 24})
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, head_dim=24, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1],
        )
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "gemma2":
        layers = common["num_hidden_layers"]
        return Gemma2Config(
            **{**common, "head_dim": 32}, query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=TEST_WINDOW,
            layer_types=[SLIDING if i % 2 == 0 else FULL for i in range(layers)],
        )
    if family == "gemma3":
        layers = common["num_hidden_layers"]
        return Gemma3TextConfig(
            **{**common, "head_dim": 32}, query_pre_attn_scalar=24, sliding_window=TEST_WINDOW,
            layer_types=[SLIDING if i % 2 == 0 else FULL for i in range(layers)],
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                FULL: {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0},
            },
        )
    if family == "phi3":
        return Phi3Config(**{"pad_token_id": None, **common})
    if family == "granite":
        return GraniteConfig(
            **common, embedding_multiplier=6.0, residual_multiplier=0.5,
            attention_multiplier=0.09, logits_scaling=2.5,
        )
    if family == "gpt_oss":
        layers = common["num_hidden_layers"]
        # A low swiglu_limit so the clamps bite on random weights; YaRN scaled past a short
        # original context so its ramp and attention factor matter.
        return GptOssConfig(
            **{**common, "head_dim": 32}, num_local_experts=4, num_experts_per_tok=2,
            swiglu_limit=0.5, sliding_window=TEST_WINDOW,
            layer_types=[SLIDING if i % 2 == 0 else FULL for i in range(layers)],
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16,
            },
        )
    raise ValueError(f"unknown family {family!r}")
