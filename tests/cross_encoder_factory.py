"""Tiny random-weight sequence classifiers and RoBERTa encoders saved like hub checkpoints
(save_pretrained + a WordPiece or Unigram tokenizer built from a small corpus), so transformers,
sentence-transformers and our engine all load the same directory."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertTokenizerFast,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaTokenizerFast,
)

CORPUS = [
    "what is the capital of france",
    "paris is the capital and largest city of france",
    "the quick brown fox jumps over the lazy dog",
    "a cross encoder scores a query against a document",
    "berlin is the capital of germany",
    "bananas are yellow and rich in potassium",
    "how do rerankers work in retrieval augmented generation",
] * 4

# The vocabularies are built from the corpus, not trained: the tokenizers library's trainers
# break frequency ties in hash order, so a trained vocabulary (and with it every logit of the
# checkpoint) changed from run to run.
_COUNTS = Counter(word for line in CORPUS for word in line.split())
_WORDS = sorted(_COUNTS, key=lambda word: (-_COUNTS[word], word))
_CHARS = sorted({char for line in CORPUS for char in line if char != " "})

_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _bert_tokenizer() -> BertTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + _CHARS + ["##" + c for c in _CHARS]
    pieces += [word for word in _WORDS if word not in pieces]  # "a" is a character already
    rust = RustTokenizer(models.WordPiece({piece: i for i, piece in enumerate(pieces)},
                                          unk_token="[UNK]"))
    rust.normalizer = normalizers.BertNormalizer(lowercase=True)
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece()
    cls, sep = rust.token_to_id("[CLS]"), rust.token_to_id("[SEP]")
    rust.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _roberta_tokenizer() -> XLMRobertaTokenizerFast:
    # XLM-R's special ids: <s>=0, <pad>=1 (the config's pad_token_id), </s>=2, <unk>=3.
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    # Whole words (with the word-start mark) by their corpus log-frequency, then the mark and
    # single characters as the fallback pieces.
    total = sum(_COUNTS.values())
    pieces = ([(piece, 0.0) for piece in specials] + [("▁", -6.0)]
              + [(c, -8.0) for c in _CHARS]
              + [("▁" + w, math.log(_COUNTS[w] / total)) for w in _WORDS])
    rust = RustTokenizer(models.Unigram(pieces, unk_id=specials.index("<unk>"),
                                        byte_fallback=False))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    bos, eos = rust.token_to_id("<s>"), rust.token_to_id("</s>")
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    return XLMRobertaTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _seeded_normal(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights large enough that logits differ between inputs (the default init's
    0.02 leaves a tiny classifier answering nearly the same logits for everything)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "LayerNorm" not in name:  # LayerNorms keep their identity init
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


def make_bert_classifier(path: Path, *, num_labels: int = 1, seed: int = 0,
                         max_positions: int = 64, chat_template: str | None = None) -> Path:
    """`chat_template`: saved with the tokenizer, for servers that also embed chat inputs."""
    tokenizer = _bert_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    labels = {0: "LABEL_0"} if num_labels == 1 else {i: LABELS[i] for i in range(num_labels)}
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                        **_SIZES,
                        id2label=labels, label2id={v: k for k, v in labels.items()},
                        architectures=["BertForSequenceClassification"])
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(_seeded_normal(model, seed), tokenizer, path)


def _xlmr_config(tokenizer: XLMRobertaTokenizerFast, **extra: object) -> XLMRobertaConfig:
    # 130 rows: pad_token_id 1 leaves 128 positions (as RoBERTa's 514 leave 512).
    return XLMRobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=130,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                            **_SIZES, **extra)


def make_xlmr_classifier(path: Path, *, num_labels: int = 3, seed: int = 1) -> Path:
    tokenizer = _roberta_tokenizer()
    labels = {0: "LABEL_0"} if num_labels == 1 else {i: LABELS[i] for i in range(num_labels)}
    config = _xlmr_config(tokenizer, id2label=labels, label2id={v: k for k, v in labels.items()},
                          architectures=["XLMRobertaForSequenceClassification"])
    model = AutoModelForSequenceClassification.from_config(config)
    return _save(_seeded_normal(model, seed), tokenizer, path)


def make_xlmr_encoder(path: Path, *, seed: int = 2) -> Path:
    tokenizer = _roberta_tokenizer()
    config = _xlmr_config(tokenizer, architectures=["XLMRobertaModel"])
    return _save(_seeded_normal(AutoModel.from_config(config), seed), tokenizer, path)
