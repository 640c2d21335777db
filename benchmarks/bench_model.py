"""A ~125M-parameter Llama-shaped checkpoint with random weights, shared by the benchmarks.

No model hub is reachable from the benchmark machines, so the model is built locally once
(seeded, hence identical on every machine) and cached as a Hugging Face directory. Only
token ids are used, so no tokenizer is saved.

Larger shapes (e.g. Llama-3-8B on a GPU) have no checkpoint at all: `ensure_shape_dir` writes
their config.json alone, and the engine serves them with `--load-format dummy` (random
weights drawn on the device); the transformers peer builds the same shape from the config.

Run from the repository root to build it ahead of time:
    .venv/bin/python -m benchmarks.bench_model [--model-dir DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path("~/.cache/protoserve/bench-llama-100m").expanduser()

# Shape of a small Llama (GQA 12q/4kv heads, head_dim 64). Changing any value here builds a
# different model: bump the cache directory name with it so stale checkpoints are not reused.
BENCH_LLAMA_SHAPE: dict[str, int | bool] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "intermediate_size": 2048,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
SEED = 0

# Llama-3-8B's published shape (GQA 32q/8kv, head_dim 128, 128k vocabulary): 8.03B parameters.
LLAMA3_8B_SHAPE: dict[str, object] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
# Shapes served from config.json alone (no weights on disk).
CONFIG_ONLY_SHAPES: dict[str, dict[str, object]] = {"llama3-8b": LLAMA3_8B_SHAPE}
SHAPE_NAMES = ("bench-100m", *CONFIG_ONLY_SHAPES)


def ensure_shape_dir(shape: str, model_dir: str | Path | None = None) -> Path:
    """A directory holding only the config.json of a CONFIG_ONLY_SHAPES entry."""
    from transformers import LlamaConfig

    target = Path(model_dir).expanduser() if model_dir else DEFAULT_MODEL_DIR.with_name(
        f"shape-{shape}")
    target.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**CONFIG_ONLY_SHAPES[shape])
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(target)
    return target


def is_config_only(model_dir: str | Path) -> bool:
    return not any(Path(model_dir).glob("*.safetensors"))


def _is_complete(model_dir: Path) -> bool:
    config_path = model_dir / "config.json"
    if not config_path.is_file() or not any(model_dir.glob("*.safetensors")):
        return False
    config = json.loads(config_path.read_text())
    return all(config.get(key) == value for key, value in BENCH_LLAMA_SHAPE.items())


def ensure_bench_model(model_dir: str | Path | None = None) -> Path:
    """Return the directory of the benchmark checkpoint, building it first if it is missing."""
    target = Path(model_dir).expanduser() if model_dir else DEFAULT_MODEL_DIR
    if _is_complete(target):
        return target

    # Imported here so that callers reusing a cached checkpoint do not pay for it.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**BENCH_LLAMA_SHAPE)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    target.mkdir(parents=True, exist_ok=True)
    # Write into a sibling directory and rename, so an interrupted build never looks complete.
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)  # safetensors, bf16
    for path in staging.iterdir():
        path.replace(target / path.name)
    staging.rmdir()
    return target


def count_parameters(model_dir: str | Path) -> int:
    """Parameter count from the shape (no weights loaded)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv_dim = config["num_key_value_heads"] * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # + two RMSNorm weights
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return config["num_hidden_layers"] * per_layer + embeddings + hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    args = parser.parse_args()
    model_dir = ensure_bench_model(args.model_dir)
    print(f"{model_dir}: {count_parameters(model_dir) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
