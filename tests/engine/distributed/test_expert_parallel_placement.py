"""Expert parallelism without starting any rank: each rank's FusedExperts over its contiguous
range of whole experts, routed over all experts, summed over the ranks (the all_reduce) is
transformers' own sparse MoE block; the checkpoint loader reads only the rank's experts; bad
combinations with `--enable-expert-parallel` fail at start-up naming the flag, and a dense
model ignores it with a warning (as the reference does)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from greedy_reference import make_peaked_model
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoConfig, MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from engine import ops
from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.distributed.group import TensorParallel
from engine.distributed.launch import check_shardable
from engine.distributed.sharding import CheckpointSharder, local_experts, shard_spec
from engine.layers.moe import FusedExperts, MoERouting
from engine.models.decoder_spec import read_decoder_spec

HIDDEN, INTER, EXPERTS, TOP_K = 48, 32, 8, 2


def _block(arch: str, dtype: torch.dtype) -> tuple[torch.nn.Module, MoERouting]:
    common = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    if arch == "mixtral":
        block = MixtralSparseMoeBlock(MixtralConfig(**common, intermediate_size=INTER,
                                                    num_local_experts=EXPERTS))
        routing = MoERouting(EXPERTS, TOP_K, renormalize=True, float32_weights=True)
    else:
        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
            **common, moe_intermediate_size=INTER, num_experts=EXPERTS, norm_topk_prob=False))
        routing = MoERouting(EXPERTS, TOP_K, renormalize=False)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    return block.to(dtype).eval(), routing


def _rank_experts(block: torch.nn.Module, routing: MoERouting, tp: TensorParallel,
                  dtype: torch.dtype) -> FusedExperts:
    held = local_experts(EXPERTS, tp)
    experts = FusedExperts(len(held), HIDDEN, INTER, routing, dtype=dtype, device="cpu",
                           first_expert=held.start)
    for expert in held:  # global ids, as the per-expert checkpoint names them
        experts.load_expert(expert, "gate_up_proj", block.experts.gate_up_proj[expert].detach())
        experts.load_expert(expert, "down_proj", block.experts.down_proj[expert].detach())
    assert experts.missing_experts() == []
    with pytest.raises(ValueError, match="out of range"):
        experts.load_expert((held.stop % EXPERTS), "w2", torch.zeros(HIDDEN, INTER))
    return experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_experts_sum_to_transformers_block(arch: str, size: int,
                                                 dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not (ops.native_available("cpu")
                                        and ops.linear_bf16_available()):
        pytest.skip("no AVX512_BF16 kernel build on this machine")
    block, routing = _block(arch, dtype)
    x = torch.randn(17, HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype)
    logits = F.linear(x, block.gate.weight)
    total = torch.zeros(17, HIDDEN, dtype=torch.float32)
    for rank in range(size):
        experts = _rank_experts(block, routing, TensorParallel(rank, size, expert_parallel=True),
                                dtype)
        if dtype == torch.bfloat16:
            assert experts.prepack()  # the native moe_bf16 kernel over the rank's subset
        total += experts(x, logits).float()
    with torch.no_grad():
        expected = block(x.unsqueeze(0)).squeeze(0).float()
    if dtype == torch.float32:
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    else:  # each rank's partial rounds to bf16 before the sum: a few ulps
        torch.testing.assert_close(total, expected, rtol=2**-6, atol=2**-6)


def test_loader_reads_only_the_ranks_experts(tmp_path: Path) -> None:
    model_dir = make_peaked_model(tmp_path / "mixtral", "mixtral")  # 4 experts
    spec = read_decoder_spec(AutoConfig.from_pretrained(model_dir))
    checkpoint = load_file(str(model_dir / "model.safetensors"))
    name = next(n for n in checkpoint if ".experts." in n and "layers.0." in n)
    kept = []
    for rank in range(2):
        sharder = CheckpointSharder(spec, TensorParallel(rank, 2, expert_parallel=True))
        if not sharder.keeps(name):
            continue
        kept.append(sharder.narrow(name, checkpoint[name]))
    if ".experts.0." in name:  # per-expert tensors: only expert 0's rank reads it, whole
        assert len(kept) == 1 and torch.equal(kept[0], checkpoint[name])
    else:  # fused [E, ...]: each rank's two experts, whole
        assert torch.equal(torch.cat(kept), checkpoint[name])
    ranks_spec = shard_spec(spec, TensorParallel(0, 2, expert_parallel=True))
    assert ranks_spec.moe == spec.moe  # whole experts: the intermediate dim unsliced


def test_bad_combinations_name_the_flag(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="--enable-expert-parallel.*--tensor-parallel-size"):
        ParallelConfig(enable_expert_parallel=True)
    model_dir = make_peaked_model(tmp_path / "mixtral", "mixtral")  # 4 heads
    spec = read_decoder_spec(AutoConfig.from_pretrained(model_dir))
    six_experts = replace(spec, moe=replace(spec.moe, num_experts=6))
    with pytest.raises(ValueError, match="--enable-expert-parallel.*6 experts"):
        shard_spec(six_experts, TensorParallel(0, 4, expert_parallel=True))
    llama_dir = make_peaked_model(tmp_path / "llama", "llama")
    config = EngineConfig(model=ModelConfig(model=str(llama_dir)), parallel=ParallelConfig(
        tensor_parallel_size=2, enable_expert_parallel=True))
    with caplog.at_level(logging.WARNING):
        check_shardable(config)  # a dense model: no error
    assert "--enable-expert-parallel is ignored" in caplog.text
