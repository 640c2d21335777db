"""Hugging Face architecture name -> our model class."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from engine.models.llama import LlamaForCausalLM

# Every supported generative architecture shares the Llama-family implementation; the
# differences (QKV bias, tied embeddings, head_dim, RoPE scaling) are read from the config.
_ARCHITECTURES: Mapping[str, type[LlamaForCausalLM]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
    }
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def get_model_class(architecture: str) -> type[LlamaForCausalLM] | None:
    return _ARCHITECTURES.get(architecture)
