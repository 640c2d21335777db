"""Perplexity of a real trained model in float32 / bf16 / int8 / int4 (--quantization), the
quality side of benchmarks/quantized_decode.py.

Run from the repository root (the fixture lives in ../shared/fixtures, see its README):
    .venv/bin/python -m benchmarks.quantized_perplexity
    .venv/bin/python -m benchmarks.quantized_perplexity --model DIR --sequences 16 --length 256

The fixture has no real tokenizer, so the held-out text is token sequences sampled from the
float32 model itself (temperature 1, seeded, via transformers): its own distribution, which
every format is then scored on, one prefill per sequence through our engine (paged cache, our
CPU kernels in bf16). A format's perplexity above float32's is what its rounding costs.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.models.loader import LoadedModel, load_model
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260k"
BLOCK_SIZE = 16
# (label, --dtype, --quantization)
FORMATS = (("float32", "float32", "auto"), ("bfloat16", "bfloat16", "auto"),
           ("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"),
           ("int8 float32", "float32", "int8"), ("int4 float32", "float32", "int4"))


def sample_sequences(model_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = int(model.config.bos_token_id)
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.full((count, 1), bos)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = model(sequences).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            sequences = torch.cat([sequences, token], dim=1)
    return sequences.tolist()


def mean_nll(loaded: LoadedModel, token_ids: list[int]) -> float:
    """Mean negative log-likelihood of token_ids[1:] given their prefixes, one prefill."""
    spec = KVCacheSpec(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, BLOCK_SIZE,
                       loaded.dtype)
    blocks = -(-len(token_ids) // BLOCK_SIZE)
    kv_caches = allocate_kv_caches(spec, blocks, loaded.device)
    request = ScheduledRequest(
        request_id="r", token_ids=token_ids, start=0, num_tokens=len(token_ids),
        block_ids=list(range(blocks)), sample=False,
        sampling_params=SamplingParams(temperature=0.0), num_prompt_tokens=len(token_ids))
    inputs = prepare_inputs(ScheduledBatch([request], len(token_ids)), BLOCK_SIZE,
                            loaded.device)
    with torch.inference_mode():
        hidden = loaded.model(inputs.input_ids, inputs.positions, kv_caches,
                              inputs.attn_metadata)
        logits = loaded.model.compute_logits(hidden)
    targets = torch.tensor(token_ids[1:])
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), targets))


def perplexities(model_dir: Path, sequences: list[list[int]]) -> dict[str, float]:
    results = {}
    for label, dtype, quantization in FORMATS:
        loaded = load_model(ModelConfig(model=str(model_dir), dtype=dtype,
                                        quantization=quantization))
        nll = sum(mean_nll(loaded, ids) for ids in sequences) / len(sequences)
        results[label] = math.exp(nll)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURE)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"no model at {args.model} (the stories260k fixture lives in "
                         "../shared/fixtures)")
    sequences = sample_sequences(args.model, args.sequences, args.length, args.seed)
    results = perplexities(args.model, sequences)
    base = results["float32"]
    print(f"{'format':>13} {'perplexity':>11}  vs float32")
    for label, value in results.items():
        print(f"{label:>13} {value:11.4f}  {100 * (value / base - 1):+.2f}%")


if __name__ == "__main__":
    main()
