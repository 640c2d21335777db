"""Hugging Face architecture name -> our model class."""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from engine.models.bert import BertModel
from engine.models.decoder import DecoderForCausalLM
from engine.models.roberta import RobertaModel, XLMRobertaModel
from engine.models.sequence_classifier import (
    BertForSequenceClassification,
    RobertaForSequenceClassification,
    XLMRobertaForSequenceClassification,
)

# Every supported generative architecture shares one decoder implementation; what differs
# between families is read from the config into a DecoderSpec (models/decoder_spec.py).
_DECODERS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
    "GptOssForCausalLM",
)
_ARCHITECTURES: Mapping[str, type[nn.Module]] = MappingProxyType(
    {
        **{name: DecoderForCausalLM for name in _DECODERS},
        # Encoders: embeddings only (bidirectional attention, no KV cache, no LM head).
        "BertModel": BertModel,
        "RobertaModel": RobertaModel,
        "XLMRobertaModel": XLMRobertaModel,
        # Sequence classifiers (cross-encoders): one logits row per input, served by Classify
        # and Score.
        "BertForSequenceClassification": BertForSequenceClassification,
        "RobertaForSequenceClassification": RobertaForSequenceClassification,
        "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    }
)


def supported_architectures() -> tuple[str, ...]:
    return tuple(_ARCHITECTURES)


def get_model_class(architecture: str) -> type[nn.Module] | None:
    return _ARCHITECTURES.get(architecture)


def is_generative(architecture: str) -> bool:
    """Decoders have an LM head; encoders can only embed."""
    return not getattr(_ARCHITECTURES.get(architecture), "is_encoder", False)


def is_classifier(architecture: str) -> bool:
    """Sequence classifiers answer logits per input instead of an embedding."""
    return bool(getattr(_ARCHITECTURES.get(architecture), "is_classifier", False))
