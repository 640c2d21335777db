"""Online weight quantization (--quantization int8 / int4) of encoder models: BERT, RoBERTa
and XLM-RoBERTa embedders, cross-encoders and classifiers.

Each encoder layer's four projections (the fused attention.self.qkv, attention.output.dense,
intermediate.dense, output.dense) become QuantizedLinear layers, round-to-nearest as the
decoder projections are. Embedding tables, LayerNorms and the classification head (pooler and
classifier, outside `encoder.layer`) stay in the served dtype: like a decoder's lm_head, the
head's few weights are the ones whose rounding moves a score most, and cost nothing to keep.
"""
from __future__ import annotations

from torch import nn

from engine.layers.quantized_linear import WeightQuant, quantize_named_linears

# Names of the projection Linears inside one encoder layer (models/bert.py BertLayer).
ENCODER_PROJECTIONS = ("qkv", "dense")


def quantize_encoder_linears(model: nn.Module, quant: WeightQuant) -> int:
    """Replace the projections of every layer under `model.encoder.layer` by their
    round-to-nearest QuantizedLinear; returns how many were replaced."""
    layers: nn.Module = model.encoder.layer  # type: ignore[assignment]
    return quantize_named_linears(layers, ENCODER_PROJECTIONS, quant)
