"""Sequence-classification heads over our BERT/RoBERTa encoders (cross-encoders, sentiment
and NLI classifiers): one logits row per sequence, read from its first token.

    BERT:     logits = classifier(tanh(pooler.dense(h[CLS])))
    RoBERTa:  logits = classifier.out_proj(tanh(classifier.dense(h[<s>])))

Dropout is an identity at inference, so it is not modelled. The runner calls `classify` on
the encoder's hidden states instead of pooling them; logits come back in float32.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.linear import Linear
from engine.models.bert import BertModel
from engine.models.roberta import RobertaModel


def num_labels_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_labels", len(getattr(hf_config, "id2label", {}) or {})))


def classifier_labels(hf_config: Any) -> tuple[str, ...]:
    """The label of each logit, in logit order (config id2label; LABEL_i where it is silent)."""
    id2label = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
    return tuple(id2label.get(i, f"LABEL_{i}") for i in range(num_labels_of(hf_config)))


# sentence-transformers' CrossEncoder records the activation it applies to a one-logit head in
# config.json (its default: sigmoid); an Identity there means scores are the raw logit.

def cross_encoder_activation(hf_config: Any) -> str:
    """"sigmoid" or "identity": how a one-logit head's output becomes a score."""
    st = getattr(hf_config, "sentence_transformers", None)
    names = [st.get("activation_fn")] if isinstance(st, dict) else []
    names.append(getattr(hf_config, "sbert_ce_default_activation_function", None))
    for name in names:
        if isinstance(name, str) and name.rsplit(".", 1)[-1] == "Identity":
            return "identity"
    return "sigmoid"


def first_token_rows(hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """hidden [T, H] of sequences laid end to end -> [N, H], each sequence's first row."""
    lens = torch.tensor(seq_lens, device=hidden.device)
    return hidden.index_select(0, torch.cumsum(lens, 0) - lens)


class BertForSequenceClassification(BertModel):
    is_classifier = True
    # The pooler is the head's first half here; only the MLM head goes unused.
    ignored_prefixes = ("cls.",)

    def __init__(self, hf_config: Any, **kwargs: Any) -> None:
        super().__init__(hf_config, **kwargs)
        dtype, device = kwargs["dtype"], kwargs["device"]
        hidden = self.dims.hidden_size
        self.pooler = nn.Module()
        self.pooler.dense = Linear(hidden, hidden, bias=True, dtype=dtype, device=device)
        self.classifier = Linear(
            hidden, num_labels_of(hf_config), bias=True, dtype=dtype, device=device
        )

    def classify(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        pooled = torch.tanh(self.pooler.dense(first_token_rows(hidden, seq_lens)))
        return self.classifier(pooled).float()


class RobertaForSequenceClassification(RobertaModel):
    is_classifier = True

    def __init__(self, hf_config: Any, **kwargs: Any) -> None:
        super().__init__(hf_config, **kwargs)
        dtype, device = kwargs["dtype"], kwargs["device"]
        hidden = self.dims.hidden_size
        self.classifier = nn.Module()
        self.classifier.dense = Linear(hidden, hidden, bias=True, dtype=dtype, device=device)
        self.classifier.out_proj = Linear(
            hidden, num_labels_of(hf_config), bias=True, dtype=dtype, device=device
        )

    def classify(self, hidden: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        head = self.classifier
        features = torch.tanh(head.dense(first_token_rows(hidden, seq_lens)))
        return head.out_proj(features).float()


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    """Same head and encoder as RoBERTa's (e.g. the bge-reranker cross-encoders)."""
