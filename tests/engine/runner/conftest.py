"""A tiny random Llama checkpoint and its transformers model (the greedy reference)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[Path, Any]:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Peaky attention and logits, so greedy paths diverge quickly on any mistake.
        initializer_range=0.15,
        # No EOS: generate() then always runs to max_new_tokens, like the scripted steps.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    return model_dir, model
