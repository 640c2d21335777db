"""Hugging Face architecture name -> our model class."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from engine.models.bert import BertModel
from engine.models.llama import LlamaForCausalLM

# Every supported generative architecture shares the Llama-family implementation; the
# differences (QKV bias, tied embeddings, head_dim, RoPE scaling) are read from the config.
_ARCHITECTURES: Mapping[str, type[nn.Module]] = MappingProxyType(
    {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
        # Encoders: embeddings only (bidirectional attention, no KV cache, no LM head).
        "BertModel": BertModel,
    }
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def get_model_class(architecture: str) -> type[nn.Module] | None:
    return _ARCHITECTURES.get(architecture)


def is_generative(architecture: str) -> bool:
    """Decoders have an LM head; encoders can only embed."""
    return not getattr(_ARCHITECTURES.get(architecture), "is_encoder", False)
