"""GPT-OSS checkpoints: a bf16 save_pretrained checkpoint loads and equals transformers on the
same weights; the MXFP4 format (a quantization_config) is refused naming the field, and so is
more than one rank (no sharding rules for sinks and checkpoint-layout experts yet)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_configs import family_config
from transformers import AutoModelForCausalLM
from test_decoder_forward import SMALL, PagedSequence, assert_logits_close, random_ids

from engine.attention import get_attention_backend
from engine.config import ModelConfig
from engine.distributed.group import TensorParallel
from engine.errors import ModelLoadError
from engine.models.decoder import DecoderForCausalLM
from engine.models.loader import load_model


def _bf16_checkpoint(tiny_checkpoint, tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """The fixture's float32 model (biases and sinks randomised) saved in bf16; the reference
    is transformers reading that checkpoint in float32 (fresh RoPE buffers)."""
    _, model = tiny_checkpoint(family_config("gpt_oss", **SMALL))
    model_dir = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model_dir, reference.eval()


def test_bf16_checkpoint_loads_and_equals_transformers(tiny_checkpoint, tmp_path: Path) -> None:
    model_dir, reference = _bf16_checkpoint(tiny_checkpoint, tmp_path)
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32"))
    prompt = random_ids(19, seed=5)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].float()
    assert_logits_close(PagedSequence(loaded, prompt, seed=6).step(len(prompt)), expected)


def test_mxfp4_quantization_config_is_refused_naming_it(tiny_checkpoint, tmp_path) -> None:
    model_dir, _ = tiny_checkpoint(family_config("gpt_oss", **SMALL))
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quantization_config"):
        load_model(ModelConfig(model=str(model_dir), dtype="float32"))


def test_tensor_parallelism_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--tensor-parallel-size 1"):
        DecoderForCausalLM(family_config("gpt_oss", **SMALL),
                           attn_backend=get_attention_backend("torch"), max_positions=64,
                           dtype=torch.float32, device=torch.device("cpu"),
                           tp=TensorParallel(rank=0, size=2))
