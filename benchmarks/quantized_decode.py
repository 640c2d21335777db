"""Batch-1 decode of a ~0.5B Llama-shaped model on CPU: bf16 weights against --quantization
int8 (per channel) and int4 (groups of 128), and W8A8 (the int8 weights with activations
quantized per token, a compressed-tensors W8A8 checkpoint's arithmetic), our kernels throughout.

Run from the repository root:
    .venv/bin/python -m benchmarks.quantized_decode                  # bf16, int8, int4
    .venv/bin/python -m benchmarks.quantized_decode --steps 64 --formats bfloat16 int4
    .venv/bin/python -m benchmarks.quantized_decode --formats int8 w8a8

The model is written as config.json alone and served with --load-format dummy (random
weights; int8/int4 quantize those at load time, as for a bf16 checkpoint). Each format decodes
--steps tokens after a 32-token prompt, one model step per token (the model's forward pass,
logits and argmax: no scheduler or server around it), and prints tokens/s and the bytes of
weights a step streams. int8 / int4 also quantize the LM head (int8 per channel) and run
with int8 activations per block of 32 (llama.cpp's arithmetic); `int8-exact` / `int4-exact`
are the same weights on the exact bf16-activation kernel (PROTOSERVE_INT_ACTIVATIONS=bf16).

Every format but W8A8 decodes all layers in one native call (models/fused_decode.py; int8 /
int4 projections on linear_int inside it); `bfloat16-per-op` is bf16 with the fused path turned
off (one kernel call per projection), W8A8's path.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from engine import ops
from engine.config import ModelConfig
from engine.linear_kernel import set_int_activations
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.layers.quantized_linear import ONLINE_SCHEMES, QuantizedLinear
from engine.models.fused_decode import FusedDecodeLayers
from engine.models.loader import LoadedModel, load_model
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

# ~0.50B parameters: 16 layers of 25.2M, embeddings and LM head of 49M each.
SHAPE: dict[str, object] = {
    "hidden_size": 1536, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 32000,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
BLOCK_SIZE = 16


def write_config(directory: Path) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    return directory


def streamed_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights one decode step reads: every projection and the LM head."""
    total = 0
    for module in loaded.model.modules():
        if isinstance(module, QuantizedLinear):
            tensors = [module.panels, module.panel_scales, module.qweight]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        elif hasattr(module, "packed_weight") and module.packed_weight is not None:
            total += module.packed_weight.numel() * module.packed_weight.element_size()
    return total


def decode_tokens_per_second(loaded: LoadedModel, steps: int) -> float:
    spec = KVCacheSpec(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, BLOCK_SIZE,
                       loaded.dtype)
    blocks = -(-(32 + steps + 1) // BLOCK_SIZE)
    kv_caches = allocate_kv_caches(spec, blocks, loaded.device)
    token_ids = list(range(7, 39))
    computed = 0

    def step(num_tokens: int) -> None:
        nonlocal computed
        request = ScheduledRequest(
            request_id="r", token_ids=token_ids, start=computed, num_tokens=num_tokens,
            block_ids=list(range(blocks)), sample=True,
            sampling_params=SamplingParams(temperature=0.0), num_prompt_tokens=32)
        inputs = prepare_inputs(ScheduledBatch([request], num_tokens), BLOCK_SIZE, loaded.device)
        with torch.inference_mode():
            hidden = loaded.model(inputs.input_ids, inputs.positions, kv_caches,
                                  inputs.attn_metadata)
            logits = loaded.model.compute_logits(hidden[-1:])
        computed += num_tokens
        token_ids.append(int(logits[-1].argmax()))

    step(len(token_ids))
    for _ in range(4):  # warm-up
        step(1)
    start = time.perf_counter()
    for _ in range(steps):
        step(1)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+",
                        default=["bfloat16", "bfloat16-per-op", "int8", "int4"],
                        choices=("bfloat16", "bfloat16-per-op", "int8", "int4", "int8-exact",
                                 "int4-exact", "w8a8"))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fused_applies = FusedDecodeLayers.applies
    with tempfile.TemporaryDirectory() as directory:
        model_dir = write_config(Path(directory))
        print(f"{'format':>9} {'tok/s':>8} {'weights/step':>13}  vs bf16")
        base = None
        for name in args.formats:
            quantization = name.removesuffix("-exact") if name.startswith("int") else "auto"
            if ops.linear_bf16_available():
                set_int_activations("bf16" if name.endswith("-exact") else "int8")
            FusedDecodeLayers.applies = (  # type: ignore[method-assign]
                (lambda self, h, m: False) if name == "bfloat16-per-op" else fused_applies)
            online_int8 = ONLINE_SCHEMES["int8"]
            if name == "w8a8":  # dummy weights load no checkpoint config: the int8 scheme
                quantization = "int8"  # with activations quantized per token instead
                ONLINE_SCHEMES["int8"] = dataclasses.replace(online_int8, int8_activations=True)
            try:
                loaded = load_model(
                    ModelConfig(model=str(model_dir), dtype="bfloat16", load_format="dummy",
                                quantization=quantization, attention_backend="cpu_paged"),
                    attention_backend="cpu_paged")
            finally:
                ONLINE_SCHEMES["int8"] = online_int8
            rate = decode_tokens_per_second(loaded, args.steps)
            base = rate if base is None else base
            print(f"{name:>9} {rate:8.2f} {streamed_bytes(loaded) / 2**20:10.0f} MiB  "
                  f"{rate / base:.2f}x")
            del loaded


if __name__ == "__main__":
    main()
