"""Tiny Hugging Face model directories with random weights, for tests.

Each directory is complete (config.json, float32 model.safetensors, generation_config.json and
the tokenizer files), so both transformers and the engine load it as they would a real model.
The tokenizer is the demo's byte-level BPE trained on the packaged corpus with a smaller
vocabulary; training is deterministic, so its serialized form is cached per process.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as RustTokenizer
from family_configs import FAMILIES, family_config
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from engine.demo.tokenizer_training import (
    chatml_template,
    corpus_text,
    to_transformers_tokenizer,
    train_byte_level_bpe,
)

CHATML_TEMPLATE = chatml_template()
FACTORY_VOCAB_SIZE = 500
ARCHITECTURES = (*FAMILIES, "mistral_window")
# Qwen2's q/k/v biases get this spread so that a forward pass that ignores them is visibly off.
QKV_BIAS_STD = 0.5


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    return train_byte_level_bpe(corpus_text(), vocab_size).to_str()


def make_tiny_tokenizer(
    *,
    vocab_size: int = FACTORY_VOCAB_SIZE,
    chat_template: str | None = CHATML_TEMPLATE,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """The factory's tokenizer (BOS 0, EOS 1, <|im_start|> 2, <|im_end|> 3)."""
    trained = RustTokenizer.from_str(_trained_tokenizer_json(vocab_size))
    return to_transformers_tokenizer(
        trained, chat_template=chat_template, model_max_length=model_max_length
    )


def save_tiny_tokenizer(
    path: Path,
    *,
    vocab_size: int = FACTORY_VOCAB_SIZE,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """A directory holding only tokenizer files (for tokenizer-only tests)."""
    make_tiny_tokenizer(vocab_size=vocab_size, chat_template=chat_template).save_pretrained(path)
    return path


def build_tiny_model(
    path: Path,
    *,
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight `arch` model and its tokenizer into `path`; return `path`.

    `vocab_size` defaults to the tokenizer's; a larger value pads the embedding (as many real
    checkpoints do). `config_overrides` go to the transformers config as-is
    (intermediate_size defaults to 2 * hidden_size).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    tokenizer = make_tiny_tokenizer(
        chat_template=chat_template, model_max_length=max_position_embeddings
    )
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < tokenizer vocabulary {len(tokenizer)}")
    config_overrides.setdefault("intermediate_size", 2 * hidden_size)
    config = family_config(
        arch,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    model = _random_model(config, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# torch's default generator is one per process: models built on several threads at once
# (servers started side by side) would draw from it interleaved, giving weights that change
# from run to run. One build at a time keeps each model's weights a function of its seed.
_DEFAULT_RNG_LOCK = threading.Lock()


def _random_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    # A private RNG stream: building a model must not disturb the caller's torch RNG.
    with _DEFAULT_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                # transformers zero-initialises biases; random ones make the bias path count.
                if name.endswith(".bias"):
                    parameter.normal_(mean=0.0, std=QKV_BIAS_STD)
    return model.eval()
