"""Build (once) and cache the built-in demo model that `engine-serve` serves without `--model`.

The demo is a small Llama with random weights and a byte-level BPE tokenizer trained on the
packaged corpus. It exists so the server, the bridge and the clients can be exercised end to end
on any machine with no download; its text is meaningless.

Invariant: a directory named `DEMO_MODEL_NAME` inside the cache is always complete, because a
build writes into a temporary sibling and renames it into place in one step. Concurrent first
starts may both build; the first rename wins and the loser discards its copy.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.demo.tokenizer_training import (
    DEMO_VOCAB_SIZE,
    chatml_template,
    corpus_text,
    to_transformers_tokenizer,
    train_byte_level_bpe,
)

DEMO_MODEL_NAME = "demo-llama-v1"
DEMO_MAX_POSITION_EMBEDDINGS = 2048
CACHE_DIR_ENV = "PROTOSERVE_CACHE_DIR"

_README = """\
# protoserve demo model

A 4-layer Llama (hidden size 256) with **random weights**, built locally by protoserve from a
fixed seed, with a byte-level BPE tokenizer trained on a small packaged English corpus.

It generates meaningless text. It exists so that the server, the REST bridge and the clients can
be tried end to end with no model download. Serve a real model with `engine-serve --model PATH`.
"""


def default_cache_dir() -> Path:
    """`$PROTOSERVE_CACHE_DIR`, else `~/.cache/protoserve`."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "protoserve"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """The demo model's directory, building it on first use; later calls return at once."""
    root = cache_dir if cache_dir is not None else default_cache_dir()
    target = root / DEMO_MODEL_NAME
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}-", dir=root))
    try:
        build_demo_model(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its finished build into place first.
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_demo_model(directory: Path) -> None:
    """Write the demo model (config, float32 safetensors, tokenizer, chat template) into
    `directory`. Byte-identical output for the same torch and transformers versions."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = to_transformers_tokenizer(
        train_byte_level_bpe(corpus_text(), DEMO_VOCAB_SIZE),
        chat_template=chatml_template(),
        model_max_length=DEMO_MAX_POSITION_EMBEDDINGS,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=704,
        max_position_embeddings=DEMO_MAX_POSITION_EMBEDDINGS,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # A private RNG stream: the build must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(_README, encoding="utf-8")
