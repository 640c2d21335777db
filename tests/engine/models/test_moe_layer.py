"""FusedExperts (engine/layers/moe.py) against transformers' own MixtralSparseMoeBlock and
Qwen3MoeSparseMoeBlock with the same weights, and its weight loading from what
transformers' save_pretrained writes (per-expert tensors, the published checkpoints' layout)
and from transformers' in-memory state dict (fused 3-D expert tensors).

The router is the model's Linear; here its logits are F.linear(x, block.gate.weight), as the
transformers router computes them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from engine import ops
from engine.layers.moe import ExpertWeight, FusedExperts, MoERouting, expert_weight_target

needs_kernel = pytest.mark.skipif(
    not (ops.native_available("cpu") and ops.linear_bf16_available()),
    reason="no AVX512_BF16 kernel build on this machine",
)

HIDDEN, INTER, EXPERTS, TOP_K = 48, 32, 8, 2


def mixtral_config(implementation: str) -> MixtralConfig:
    config = MixtralConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    config._experts_implementation = implementation
    return config


def qwen3_moe_config(implementation: str, norm_topk_prob: bool) -> Qwen3MoeConfig:
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=norm_topk_prob,
    )
    config._experts_implementation = implementation
    return config


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within one bf16 ulp (floor at the output's scale), and nearly all bit-identical."""
    error = (actual.double() - expected.double()).abs()
    tolerance = expected.double().abs() * 2.0**-7 + 2.0**-12 * float(expected.abs().max())
    assert bool((error <= tolerance).all()), f"max error {float(error.max())}"
    assert float((actual == expected).float().mean()) > 0.99


def routing_for(config: MixtralConfig | Qwen3MoeConfig) -> MoERouting:
    if isinstance(config, MixtralConfig):
        return MoERouting(config.num_local_experts, config.num_experts_per_tok, renormalize=True,
                          float32_weights=True)
    return MoERouting(config.num_experts, config.num_experts_per_tok,
                      renormalize=config.norm_topk_prob)


def block_for(config: MixtralConfig | Qwen3MoeConfig, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = MixtralSparseMoeBlock if isinstance(config, MixtralConfig) else Qwen3MoeSparseMoeBlock
    block = cls(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    return block.to(dtype).eval()


def experts_from(block: torch.nn.Module, routing: MoERouting) -> FusedExperts:
    weight = block.experts.gate_up_proj
    experts = FusedExperts(EXPERTS, HIDDEN, INTER, routing, dtype=weight.dtype, device="cpu")
    experts.load_expert(None, "gate_up_proj", block.experts.gate_up_proj.detach())
    experts.load_expert(None, "down_proj", block.experts.down_proj.detach())
    return experts


CONFIGS = [
    pytest.param(lambda impl: mixtral_config(impl), id="mixtral"),
    pytest.param(lambda impl: qwen3_moe_config(impl, norm_topk_prob=True), id="qwen3-moe-norm"),
    pytest.param(lambda impl: qwen3_moe_config(impl, norm_topk_prob=False), id="qwen3-moe"),
]


@pytest.mark.parametrize("make_config", CONFIGS)
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_float32_matches_transformers_block(make_config, implementation: str,
                                            num_tokens: int) -> None:
    config = make_config(implementation)
    block = block_for(config, torch.float32)
    experts = experts_from(block, routing_for(config))
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    with torch.no_grad():
        expected = block(x.unsqueeze(0)).squeeze(0)
    out = experts(x, F.linear(x, block.gate.weight))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("make_config", CONFIGS)
@pytest.mark.parametrize("num_tokens", [1, 3, 64])
def test_bf16_kernel_matches_transformers_block(make_config, num_tokens: int) -> None:
    """transformers' default experts forward in bf16 rounds as our kernel does (Mixtral's
    float32 routing weights included), so nearly every output is bit-identical."""
    config = make_config("grouped_mm")
    block = block_for(config, torch.bfloat16)
    experts = experts_from(block, routing_for(config))
    assert experts.prepack()
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(9)).bfloat16()
    with torch.no_grad():
        expected = block(x.unsqueeze(0)).squeeze(0)
    assert_close_bf16(experts(x, F.linear(x, block.gate.weight)), expected)


def test_weight_targets_of_both_checkpoint_layouts() -> None:
    assert expert_weight_target("model.layers.3.block_sparse_moe.experts.5.w1.weight") == \
        ExpertWeight(5, "gate_proj")
    assert expert_weight_target("experts.0.w3.weight") == ExpertWeight(0, "up_proj")
    assert expert_weight_target("model.layers.0.mlp.experts.12.down_proj.weight") == \
        ExpertWeight(12, "down_proj")
    assert expert_weight_target("model.layers.0.mlp.experts.gate_up_proj") == \
        ExpertWeight(None, "gate_up_proj")
    assert expert_weight_target("model.layers.0.mlp.experts.down_proj") == \
        ExpertWeight(None, "down_proj")
    for other in ("model.layers.0.mlp.gate.weight", "model.layers.0.block_sparse_moe.gate.weight",
                  "model.layers.0.mlp.shared_expert.gate_proj.weight",
                  "model.layers.0.self_attn.q_proj.weight"):
        assert expert_weight_target(other) is None


def load_layer(experts: FusedExperts, tensors: dict[str, torch.Tensor], layer: int) -> None:
    prefix = f"model.layers.{layer}."
    for name, tensor in tensors.items():
        target = expert_weight_target(name)
        if name.startswith(prefix) and target is not None:
            experts.load_expert(target.expert, target.projection, tensor)


@pytest.mark.parametrize("model_kind", ["mixtral", "qwen3-moe"])
@pytest.mark.parametrize("source", ["save_pretrained", "state_dict"])
def test_loads_checkpoint_tensors(tmp_path: Path, model_kind: str, source: str) -> None:
    if model_kind == "mixtral":
        config, cls = mixtral_config("grouped_mm"), MixtralForCausalLM
    else:
        config, cls = qwen3_moe_config("grouped_mm", norm_topk_prob=True), Qwen3MoeForCausalLM
    torch.manual_seed(1)
    model = cls(config).eval()
    if source == "save_pretrained":
        model.save_pretrained(tmp_path)
        tensors = load_file(tmp_path / "model.safetensors")
        per_expert = [name for name in tensors if ".experts.3." in name]
        assert len(per_expert) == 3, per_expert  # the hub layout: one tensor per projection
    else:
        tensors = model.state_dict()
    experts = FusedExperts(EXPERTS, HIDDEN, INTER, routing_for(config), dtype=torch.float32,
                           device="cpu")
    load_layer(experts, tensors, layer=0)
    assert experts.missing_experts() == []
    block = model.model.layers[0].mlp
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = block(x.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(experts(x, F.linear(x, block.gate.weight)), expected,
                               rtol=1e-5, atol=1e-5)


def test_missing_and_malformed_expert_weights_are_named() -> None:
    experts = FusedExperts(4, 8, 6, MoERouting(4, 2, True), dtype=torch.float32, device="cpu")
    experts.load_expert(None, "down_proj", torch.zeros(4, 8, 6))
    experts.load_expert(1, "w1", torch.zeros(6, 8))
    experts.load_expert(1, "up_proj", torch.zeros(6, 8))
    missing = experts.missing_experts()
    assert "experts.0.gate_proj" in missing and "experts.1.gate_proj" not in missing
    assert not any(name.endswith("down_proj") for name in missing)
    assert len(missing) == 6
    with pytest.raises(ValueError, match=r"up_proj of expert 2: expected shape \(6, 8\)"):
        experts.load_expert(2, "up_proj", torch.zeros(8, 6))
    with pytest.raises(ValueError, match="expert 4 out of range"):
        experts.load_expert(4, "w2", torch.zeros(8, 6))
    with pytest.raises(ValueError, match="unknown expert projection 'w4'"):
        experts.load_expert(0, "w4", torch.zeros(6, 8))
    with pytest.raises(ValueError, match="gate_proj needs an expert index"):
        experts.load_expert(None, "gate_proj", torch.zeros(4, 6, 8))
    with pytest.raises(ValueError, match="top_k must be in"):
        MoERouting(4, 5, True)
    with pytest.raises(ValueError, match="router_logits must be"):
        experts(torch.zeros(3, 8), torch.zeros(3, 5))
