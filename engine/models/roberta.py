"""RoBERTa-family encoders (RobertaModel, XLMRobertaModel): BERT's layers with two
checkpoint differences, so the forward pass is BertModel's.

- Position ids start at padding_idx + 1 (row padding_idx of the table is the padding row), so
  a 514-row table serves 512 tokens.
- Tensors are nested under "roberta." in *For* checkpoints, and there is one token type.
"""
from __future__ import annotations

from typing import Any

from engine.models.bert import BertModel


def roberta_position_offset(hf_config: Any) -> int:
    """First position row a real token reads: padding_idx + 1 (transformers'
    create_position_ids_from_input_ids numbers non-padding tokens from there)."""
    return int(getattr(hf_config, "pad_token_id", 1) or 0) + 1


class RobertaModel(BertModel):
    checkpoint_prefix = "roberta."

    @staticmethod
    def position_offset(hf_config: Any) -> int:
        return roberta_position_offset(hf_config)


class XLMRobertaModel(RobertaModel):
    """Same architecture as RoBERTa (a larger vocabulary, a SentencePiece tokenizer)."""
