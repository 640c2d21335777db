"""Tensor-parallel slicing and start-up refusals, without starting any rank: each rank's
slice of a real transformers checkpoint, put back together, is the checkpoint tensor, laid out
as the rank's fused parameters expect; models and flags that cannot split fail at start-up
with the flag named."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from greedy_reference import make_peaked_model
from transformers import AutoConfig
from safetensors.torch import load_file

from engine.config import EngineConfig, LoRAConfig, ModelConfig, ParallelConfig
from engine.distributed.group import TensorParallel
from engine.distributed.sharding import CheckpointSharder, shard_spec, stage_layers
from engine.frontend.llm import LLM
from engine.models.decoder_spec import read_decoder_spec


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _slices(model_dir: Path, name: str, size: int) -> list[torch.Tensor]:
    spec = read_decoder_spec(AutoConfig.from_pretrained(model_dir))
    tensor = _checkpoint(model_dir)[name]
    return [CheckpointSharder(spec, TensorParallel(rank, size)).narrow(name, tensor)
            for rank in range(size)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("llama"), "llama")  # 4 heads, 2 KV


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peaked_model(tmp_path_factory.mktemp("phi3"), "phi3")


@pytest.mark.parametrize("size", [2, 4])
def test_column_and_row_parallel_slices_rebuild_the_checkpoint(llama_dir: Path,
                                                               size: int) -> None:
    weights = _checkpoint(llama_dir)
    for name, dim in [("model.layers.0.self_attn.q_proj.weight", 0),
                      ("model.layers.0.mlp.up_proj.weight", 0),
                      ("model.layers.0.self_attn.o_proj.weight", 1),
                      ("model.layers.1.mlp.down_proj.weight", 1),
                      ("model.embed_tokens.weight", 0), ("lm_head.weight", 0)]:
        assert torch.equal(torch.cat(_slices(llama_dir, name, size), dim=dim), weights[name])
    norm = "model.layers.0.input_layernorm.weight"
    assert all(torch.equal(s, weights[norm]) for s in _slices(llama_dir, norm, size))


def test_kv_heads_split_at_two_ranks_and_replicate_at_four(llama_dir: Path) -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    full = _checkpoint(llama_dir)[name]  # 2 KV heads of 16 rows
    assert torch.equal(torch.cat(_slices(llama_dir, name, 2)), full)
    # Four ranks, one q head each: ranks 0-1 read KV head 0, ranks 2-3 KV head 1, as the
    # GQA grouping of q heads 0-1 and 2-3 says.
    heads = full.split(16)
    assert [torch.equal(s, heads[r // 2]) for r, s in enumerate(_slices(llama_dir, name, 4))] \
        == [True] * 4


def test_fused_phi3_checkpoint_slices_keep_qkv_and_gate_up_layouts(phi3_dir: Path) -> None:
    weights = _checkpoint(phi3_dir)
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    q, k, v = qkv.split([64, 32, 32])
    parts = _slices(phi3_dir, "model.layers.0.self_attn.qkv_proj.weight", 2)
    for rank, part in enumerate(parts):  # each rank: [its q heads | its k head | its v head]
        assert torch.equal(part, torch.cat([q.chunk(2)[rank], k.chunk(2)[rank],
                                            v.chunk(2)[rank]]))
    gate, up = weights["model.layers.0.mlp.gate_up_proj.weight"].chunk(2)
    parts = _slices(phi3_dir, "model.layers.0.mlp.gate_up_proj.weight", 2)
    for rank, part in enumerate(parts):  # [its gate rows | its up rows]
        assert torch.equal(part, torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))


def test_vocab_not_divisible_pads_the_last_rank() -> None:
    spec = read_decoder_spec(AutoConfig.for_model("llama", vocab_size=10, hidden_size=8,
                                                  num_attention_heads=4, num_key_value_heads=4,
                                                  intermediate_size=16))
    table = torch.arange(30, dtype=torch.float32).view(10, 3)
    parts = [CheckpointSharder(spec, TensorParallel(r, 4)).narrow("model.embed_tokens.weight",
                                                                  table) for r in range(4)]
    assert [p.shape[0] for p in parts] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(parts)[:10], table) and not parts[3][1:].any()


@pytest.mark.parametrize(("heads", "kv_heads", "size", "what"), [
    (4, 2, 3, "4 attention heads"),
    (6, 6, 4, "6 attention heads"),
    (8, 6, 4, "6 KV heads"),
])
def test_sizes_that_do_not_split_name_the_flag(heads: int, kv_heads: int, size: int,
                                               what: str) -> None:
    spec = read_decoder_spec(AutoConfig.for_model(
        "llama", hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=96, vocab_size=32))
    with pytest.raises(ValueError, match=f"--tensor-parallel-size does not divide.*{what}"):
        shard_spec(spec, TensorParallel(0, size))


def test_llm_refuses_a_size_that_does_not_split_before_starting_ranks(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="--tensor-parallel-size does not divide the model's "
                                         "4 attention heads"):
        LLM(str(llama_dir), dtype="float32", tensor_parallel_size=3)


@pytest.mark.parametrize(("change", "flag"), [
    ({"model": ModelConfig("m", quantization="int8")}, "--quantization int8"),
    ({"model": ModelConfig("m", task="embed")}, "--task embed"),
])
def test_features_not_split_across_ranks_are_refused(change: dict, flag: str) -> None:
    fields = {"model": ModelConfig("m"), "parallel": ParallelConfig(tensor_parallel_size=2),
              **change}
    with pytest.raises(ValueError, match=f"{flag} is not supported with --tensor-parallel-size"):
        EngineConfig(**fields)


def test_lora_is_refused_with_pipeline_stages_only() -> None:
    """Tensor parallelism serves LoRA (test_lora_tensor_parallel); pipeline stages do not."""
    EngineConfig(model=ModelConfig("m"), lora=LoRAConfig(),
                 parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="--enable-lora is not supported with "
                                         "--pipeline-parallel-size > 1"):
        EngineConfig(model=ModelConfig("m"), lora=LoRAConfig(),
                     parallel=ParallelConfig(pipeline_parallel_size=2))


def test_stages_split_layers_evenly_and_refuse_more_stages_than_layers() -> None:
    assert [stage_layers(5, TensorParallel(stage=s, num_stages=2)) for s in range(2)] == [
        range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="--pipeline-parallel-size 3 exceeds the model's 2"):
        stage_layers(2, TensorParallel(num_stages=3))


def test_bad_parallel_sizes_and_node_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="--pipeline-parallel-size"):
        ParallelConfig(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="--node-rank"):
        ParallelConfig(tensor_parallel_size=4, nnodes=2, node_rank=2)
    with pytest.raises(ValueError, match="multiple of --nnodes"):
        ParallelConfig(tensor_parallel_size=3, nnodes=2)
