"""Every RoPE scaling type and partial rotary against transformers' own rotary classes.

Our tables come from `build_rotary`; the reference is the rotary embedding class of a family
using that type (Llama for the generic types, Phi-3 for LongRoPE, StableLM for partial rotary),
run on the same positions, and its `apply_rotary_pos_emb` on the same q/k. float32 throughout
unless a test says otherwise.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, StableLmConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply
from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

from engine.errors import ModelLoadError
from engine.layers.rotary import (
    SUPPORTED_ROPE_TYPES,
    RotaryEmbedding,
    apply_rotary,
    build_rotary,
    rotate_in_place,
)
from engine.models.loader import _check_rope

HEAD_DIM = 32
NUM_HEADS, NUM_KV_HEADS = 4, 2


def _llama(rope_parameters: dict[str, Any], max_position_embeddings: int = 256) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=NUM_HEADS * HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


def _phi3(original: int, partial_rotary_factor: float = 1.0, **extra: Any) -> Phi3Config:
    """A Phi-3/Phi-4-mini style LongRoPE config: 4x the pretrained length, distinct factors."""
    pairs = int(HEAD_DIM * partial_rotary_factor) // 2
    return Phi3Config(
        hidden_size=NUM_HEADS * HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=4 * original,
        original_max_position_embeddings=original,
        partial_rotary_factor=partial_rotary_factor,
        pad_token_id=0,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
            "long_factor": [1.0 + 0.9 * i for i in range(pairs)],
            **extra,
        },
    )


def _reference_tables(reference: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin [T, rotary_dim] for one sequence holding `positions`."""
    cos, sin = reference(torch.zeros(1), positions[None])
    return cos[0], sin[0]


def _assert_tables_match(ours: RotaryEmbedding, reference: Any, positions: torch.Tensor) -> None:
    expected_cos, expected_sin = _reference_tables(reference, positions)
    cos, signed_sin = ours.lookup(positions, torch.float32)
    half = ours.rotary_dim // 2
    # Our sin table carries the rotate-half sign: [-sin | sin].
    sin = torch.cat((signed_sin[:, 0, half:], signed_sin[:, 0, half:]), dim=-1)
    assert torch.equal(signed_sin[:, 0, :half], -signed_sin[:, 0, half:])
    assert cos.shape[-1] == expected_cos.shape[-1]
    torch.testing.assert_close(cos[:, 0], expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, expected_sin, atol=1e-6, rtol=0)


def _assert_rotation_matches(
    ours: RotaryEmbedding, reference: Any, apply_reference: Any, positions: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> None:
    """q and k rotated as our attention does (one strided view over the fused projection)
    against the reference's apply_rotary_pos_emb on [batch, heads, tokens, head_dim]."""
    torch.manual_seed(0)
    heads = NUM_HEADS + NUM_KV_HEADS
    qkv = torch.randn(len(positions), (heads + NUM_KV_HEADS) * HEAD_DIM).to(dtype)
    qk = qkv[:, : heads * HEAD_DIM].view(len(positions), heads, HEAD_DIM)
    query, key = qk[:, :NUM_HEADS].clone(), qk[:, NUM_HEADS:].clone()
    cos, sin = reference(torch.zeros(1, dtype=dtype), positions[None])
    expected_q, expected_k = apply_reference(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin
    )
    our_cos, our_signed_sin = ours.lookup(positions, dtype)
    rotated = rotate_in_place(qk, our_cos, our_signed_sin)
    exact = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(rotated[:, :NUM_HEADS], expected_q[0].transpose(0, 1), **exact)
    torch.testing.assert_close(rotated[:, NUM_HEADS:], expected_k[0].transpose(0, 1), **exact)


STATIC_TYPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    # DeepSeek-V3 style: the attention factor is mscale over mscale_all_dim.
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "beta_fast": 16,
        "beta_slow": 2,
    },
    # A null factor: the ratio of max_position_embeddings to the pretrained length (here 4).
    "yarn_implicit_factor": {
        "rope_type": "yarn",
        "factor": None,
        "original_max_position_embeddings": 64,
    },
    # gpt-oss style: an explicit attention factor and no floor/ceil on the correction range.
    "yarn_untruncated": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "attention_factor": 1.25,
        "truncate": False,
    },
}


@pytest.mark.parametrize("name", list(STATIC_TYPES))
def test_static_rope_types_match_llama_rotary(name: str) -> None:
    config = _llama(STATIC_TYPES[name])
    ours = build_rotary(config, HEAD_DIM, 256, "cpu")
    reference = LlamaRotaryEmbedding(config)
    assert ours.attention_scaling == pytest.approx(reference.attention_scaling, abs=0)
    if name.startswith("yarn"):
        assert ours.attention_scaling != 1.0  # the factor really is folded into the tables
    positions = torch.arange(256)
    _assert_tables_match(ours, reference, positions)
    _assert_rotation_matches(ours, reference, llama_apply, torch.tensor([0, 255, 3, 64, 200]))


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_scaled_rotation_is_bit_identical_in_bfloat16(name: str) -> None:
    """bf16 tables rounded after the attention scaling, as transformers rounds them; the
    rotation runs the fused kernel where it is built."""
    config = _llama(STATIC_TYPES[name])
    ours = build_rotary(config, HEAD_DIM, 256, "cpu")
    reference = LlamaRotaryEmbedding(config)
    _assert_rotation_matches(
        ours, reference, llama_apply, torch.tensor([7, 255, 64, 1]), torch.bfloat16
    )


def test_dynamic_ntk_uses_the_frequencies_of_the_longest_sequence() -> None:
    """Served as vLLM does: one table at the NTK base for max_position_embeddings * factor,
    which is what transformers computes once a sequence reaches that length."""
    config = _llama({"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    ours = build_rotary(config, HEAD_DIM, 128, "cpu")
    reference = LlamaRotaryEmbedding(config)
    positions = torch.arange(128)
    _assert_tables_match(ours, reference, positions)  # the reference grows to 128 here
    _assert_rotation_matches(ours, reference, llama_apply, torch.tensor([127, 0, 64, 9]))
    # The table does not depend on the served length (keys in the cache keep their rotation).
    shorter = build_rotary(config, HEAD_DIM, 32, "cpu")
    torch.testing.assert_close(shorter.cos_cache, ours.cos_cache[:32], atol=0, rtol=0)
    unscaled = build_rotary(_llama({"rope_type": "default"}, 64), HEAD_DIM, 128, "cpu")
    assert not torch.allclose(unscaled.cos_cache, ours.cos_cache)


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.75])
def test_longrope_within_the_pretrained_length_uses_the_short_factors(
    partial_rotary_factor: float,
) -> None:
    """Served length <= original_max_position_embeddings: equal to transformers at every
    sequence length up to it (transformers switches to the long factors only past it)."""
    config = _phi3(original=64, partial_rotary_factor=partial_rotary_factor)
    ours = build_rotary(config, HEAD_DIM, 64, "cpu")
    assert ours.rotary_dim == int(HEAD_DIM * partial_rotary_factor)
    assert ours.attention_scaling > 1.0  # sqrt(1 + ln 4 / ln 64): it applies to short too
    for length in (1, 17, 64):
        reference = Phi3RotaryEmbedding(config)
        assert ours.attention_scaling == reference.attention_scaling
        _assert_tables_match(ours, reference, torch.arange(length))
    _assert_rotation_matches(ours, Phi3RotaryEmbedding(config), phi3_apply, torch.arange(64))


@pytest.mark.parametrize("partial_rotary_factor", [1.0, 0.75])
def test_longrope_past_the_pretrained_length_uses_the_long_factors(
    partial_rotary_factor: float,
) -> None:
    config = _phi3(original=64, partial_rotary_factor=partial_rotary_factor)
    ours = build_rotary(config, HEAD_DIM, 256, "cpu")
    reference = Phi3RotaryEmbedding(config)
    positions = torch.arange(256)  # longer than 64: the reference takes its long factors
    _assert_tables_match(ours, reference, positions)
    _assert_rotation_matches(ours, reference, phi3_apply, torch.tensor([255, 0, 64, 100]))
    short = build_rotary(config, HEAD_DIM, 64, "cpu")
    assert not torch.allclose(short.cos_cache[1:64], ours.cos_cache[1:64])


def test_longrope_explicit_factor_and_attention_factor() -> None:
    config = _phi3(original=64, factor=2.0, attention_factor=0.9)
    ours = build_rotary(config, HEAD_DIM, 256, "cpu")
    assert ours.attention_scaling == 0.9
    _assert_tables_match(ours, Phi3RotaryEmbedding(config), torch.arange(256))


def test_partial_rotary_rotates_the_leading_dims_only() -> None:
    """StableLM rotates a quarter of each head; the rest passes through untouched."""
    config = StableLmConfig(
        hidden_size=NUM_HEADS * HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        partial_rotary_factor=0.25,
        max_position_embeddings=128,
    )
    ours = build_rotary(config, HEAD_DIM, 128, "cpu")
    assert ours.rotary_dim == 8
    reference = StableLmRotaryEmbedding(config)
    _assert_tables_match(ours, reference, torch.arange(128))
    for dtype in (torch.float32, torch.bfloat16):  # bf16: the torch path, bit for bit
        _assert_rotation_matches(ours, reference, phi3_apply, torch.tensor([3, 127, 0]), dtype)


def test_rotary_dim_config_equals_the_same_partial_factor() -> None:
    """Configs that give `rotary_dim` directly rotate that many dims, like the equivalent
    partial_rotary_factor (here 16 of 32 = 0.5)."""
    by_factor = StableLmConfig(
        hidden_size=NUM_HEADS * HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        partial_rotary_factor=0.5,
        max_position_embeddings=64,
    )
    by_dim = SimpleNamespace(rope_theta=10000.0, rotary_dim=16, max_position_embeddings=64)
    ours = build_rotary(by_dim, HEAD_DIM, 64, "cpu")
    assert ours.rotary_dim == 16
    _assert_tables_match(ours, StableLmRotaryEmbedding(by_factor), torch.arange(64))


def test_apply_rotary_keeps_the_pass_through_dims() -> None:
    rotary = build_rotary(SimpleNamespace(rope_theta=100.0, rotary_dim=4), 12, 8, "cpu")
    x = torch.randn(8, 3, 12)
    cos, signed_sin = rotary.lookup(torch.arange(8), torch.float32)
    rotated = apply_rotary(x, cos, signed_sin)
    assert torch.equal(rotated[..., 4:], x[..., 4:])
    assert torch.equal(rotated[0], x[0])  # position 0 is the identity rotation
    assert not torch.allclose(rotated[1:, :, :4], x[1:, :, :4])


INVALID = [
    ({"rope_type": "linear"}, "rope_parameters.factor is required"),
    ({"rope_type": "linear", "factor": "4"}, "rope_parameters.factor must be a positive number"),
    ({"rope_type": "dynamic", "factor": 0}, "rope_parameters.factor must be a positive number"),
    (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "original_max_position_embeddings": 64},
        "rope_parameters.high_freq_factor is required",
    ),
    (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
         "original_max_position_embeddings": 64},
        "rope_parameters.high_freq_factor",
    ),
    (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "attention_factor": -1.0},
        "rope_parameters.attention_factor",
    ),
    (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
         "truncate": "yes"},
        "rope_parameters.truncate",
    ),
    (
        {"rope_type": "longrope", "short_factor": [1.0] * 16,
         "original_max_position_embeddings": 64},
        "rope_parameters.long_factor is required",
    ),
    (
        {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 15,
         "original_max_position_embeddings": 64},
        "rope_parameters.long_factor has 15 entries",
    ),
    ({"rope_type": "default", "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"rope_type": "default", "partial_rotary_factor": 0.1}, "partial_rotary_factor"),
    ({"rope_type": "default", "rope_theta": -5.0}, "rope_parameters.rope_theta"),
    ({"rope_type": "alibi"}, "rope_parameters.rope_type 'alibi'"),
]


@pytest.mark.parametrize(("params", "message"), INVALID)
def test_invalid_rope_parameters_name_the_field(params: dict[str, Any], message: str) -> None:
    # A plain namespace: transformers' own config classes reject some of these on creation.
    config = SimpleNamespace(
        rope_parameters={"rope_theta": 10000.0, **params}, max_position_embeddings=256
    )
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        build_rotary(config, HEAD_DIM, 256, "cpu")


def test_old_rope_scaling_layout_is_named_in_errors() -> None:
    config = SimpleNamespace(rope_theta=10000.0, rope_scaling={"type": "linear"})
    with pytest.raises(ValueError, match=r"rope_scaling\.factor is required"):
        build_rotary(config, HEAD_DIM, 16, "cpu")
    with pytest.raises(ValueError, match="max_positions"):
        build_rotary(_llama({"rope_type": "default"}), HEAD_DIM, 0, "cpu")


def test_loader_checks_every_supported_type_and_names_bad_fields() -> None:
    assert set(SUPPORTED_ROPE_TYPES) == {
        "default", "linear", "dynamic", "yarn", "longrope", "llama3"
    }
    for params in STATIC_TYPES.values():
        _check_rope(_llama(params), Path("/models/m"))
    _check_rope(_llama({"rope_type": "dynamic", "factor": 2.0}), Path("/models/m"))
    _check_rope(_phi3(original=4096, partial_rotary_factor=0.75), Path("/models/m"))
    bad = _phi3(original=64)
    bad.rope_parameters["long_factor"] = bad.rope_parameters["long_factor"][:-1]
    with pytest.raises(ModelLoadError, match=r"/models/m/config\.json.*long_factor has 15"):
        _check_rope(bad, Path("/models/m"))
    with pytest.raises(ModelLoadError, match="unsupported rope_type 'alibi'.*supported: default"):
        _check_rope(SimpleNamespace(rope_parameters={"rope_type": "alibi"}), Path("/models/m"))


def test_loader_checks_each_rope_set_of_per_layer_configs() -> None:
    """Gemma 3 keeps one rope_parameters dict per layer type; each is checked."""
    nested = SimpleNamespace(
        head_dim=HEAD_DIM,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
        },
    )
    _check_rope(nested, Path("/m"))
    nested.rope_parameters["full_attention"] = {"rope_type": "linear", "rope_theta": 1e6}
    with pytest.raises(ModelLoadError, match=r"rope_parameters\.factor is required"):
        _check_rope(nested, Path("/m"))
