"""Tiny random Llama-family checkpoints saved with transformers (the reference model)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

TinyCheckpoint = Callable[[PretrainedConfig], tuple[Path, Any]]


def randomize_biases(model: torch.nn.Module) -> None:
    """HF initialises projection biases to zero, which would hide a misplaced bias (GPT-OSS
    experts' `*_proj_bias` and attention sinks included)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".bias", "_bias", ".sinks")):
                param.normal_(0.0, 0.5)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> TinyCheckpoint:
    """Save a float32 model built from `config` with seeded random weights; returns its
    directory and the HF model (eval) as the reference."""
    counter = iter(range(1000))

    def build(config: PretrainedConfig) -> tuple[Path, Any]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize_biases(model)
        model_dir = tmp_path / f"model{next(counter)}"
        model.save_pretrained(model_dir)
        return model_dir, model.eval()

    return build
