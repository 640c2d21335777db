"""Random-weight checkpoints shaped like the families the benchmarks compare on, scaled down to
fit this machine, built once (seeded) and cached as Hugging Face directories (bf16):

    qwen3-moe   Qwen3-30B-A3B's expert layout (128 experts, top-8, q/k norm, head_dim 128)
                with a smaller hidden size and fewer layers
    gemma2      Gemma-2-2B's layer recipe (sandwich norms, GeGLU, soft-capping, alternating
                sliding-window / global layers, head_dim 256) at about 160M parameters
    gpt-oss     gpt-oss-20b's layer recipe (32 experts, top-4, biased router and experts with
                the clamped SwiGLU, attention sinks, alternating 128-token sliding-window /
                full layers, YaRN, head_dim 64) with a smaller hidden size and fewer layers

Transformers and the engine load them (and vLLM's CPU build, when installed), so each
peer runs the same weights. The tokenizer is the benchmarks' word-level one (every id one
word; benchmarks/frontend_tax.py), copied in so every server loads the directory as is.

    .venv/bin/python -m benchmarks.family_models --shape qwen3-moe     # prints the directory
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

CACHE_ROOT = Path("~/.cache/protoserve").expanduser()
SEED = 0

# Changing a value builds a different model: bump the directory name with it.
FAMILY_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-moe": ("bench-qwen3-moe-v1", {
        "model_type": "qwen3_moe",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 1536,
        "moe_intermediate_size": 256,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }),
    "gemma2": ("bench-gemma2-v1", {
        "model_type": "gemma2",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 3072,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 512,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }),
    # rope_parameters: GptOssConfig's default (YaRN, factor 32 over 4096 positions).
    "gpt-oss": ("bench-gpt-oss-v1", {
        "model_type": "gpt_oss",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "sliding_window": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }),
}

FAMILY_SHAPES_BY_DIR = {directory: fields for directory, fields in FAMILY_SHAPES.values()}


def family_model_dir(shape: str) -> Path:
    return CACHE_ROOT / FAMILY_SHAPES[shape][0]


def ensure_family_model(shape: str) -> Path:
    """The directory of `shape`'s checkpoint, building it first if it is missing."""
    target = family_model_dir(shape)
    if _is_built(target, FAMILY_SHAPES[shape][1]["model_type"]):
        _add_tokenizer(target)
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(FAMILY_SHAPES[shape][1])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    target.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():  # rename last: an interrupted build never looks complete
        path.replace(target / path.name)
    staging.rmdir()
    _add_tokenizer(target)
    return target


def _is_built(target: Path, model_type: str) -> bool:
    """Whether `target` holds a complete checkpoint of this shape's family. A directory of
    another architecture under the shape's name (a copy of the Llama bench model was found
    there once) would silently benchmark the wrong model, so it is rebuilt."""
    config = target / "config.json"
    if not config.is_file() or not any(target.glob("*.safetensors")):
        return False
    return json.loads(config.read_text()).get("model_type") == model_type


def _add_tokenizer(target: Path) -> None:
    from benchmarks.frontend_tax import ensure_word_tokenizer

    vocab_size = int(FAMILY_SHAPES_BY_DIR[target.name]["vocab_size"])
    for path in ensure_word_tokenizer(vocab_size).iterdir():
        if not (target / path.name).exists():
            shutil.copy(path, target / path.name)


def active_weight_bytes(shape: str) -> tuple[int, int]:
    """(all weight bytes, bytes one decode token reads) in bf16: the MoE reads top_k of its
    experts per layer; the embedding row read is negligible and left out."""
    config = json.loads((family_model_dir(shape) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    attention = hidden * (q + 2 * kv) + q * hidden
    head = config["vocab_size"] * hidden
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (Mixtral's name).
    num_experts = config.get("num_local_experts", config.get("num_experts"))
    if num_experts:
        # GPT-OSS's experts are intermediate_size wide (it has no dense MLP).
        expert = 3 * hidden * config.get("moe_intermediate_size", config["intermediate_size"])
        router = hidden * num_experts
        total = layers * (attention + router + num_experts * expert) + head
        active = layers * (attention + router + config["num_experts_per_tok"] * expert) + head
    else:
        total = active = layers * (attention + 3 * hidden * config["intermediate_size"]) + head
    return 2 * total, 2 * active


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(FAMILY_SHAPES), required=True)
    args = parser.parse_args()
    print(ensure_family_model(args.shape))


if __name__ == "__main__":
    main()
