"""Random-weight PEFT LoRA adapters of a tiny checkpoint, written by peft itself, and peft's
own models as the reference (unmerged PeftModel and merge_and_unload)."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(
    base_dir: Path, out_dir: Path, *, rank: int, targets: list[str], seed: int,
    alpha: int = 16, use_rslora: bool = False,
) -> Path:
    """A LoRA of `base_dir` with non-zero A and B (a fresh PEFT adapter's B is zero, so it
    would change nothing), saved as adapter_config.json + adapter_model.safetensors."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
        use_rslora=use_rslora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def peft_reference(base_dir: Path, adapter_dir: Path, *, merged: bool) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model.merge_and_unload().eval() if merged else model
