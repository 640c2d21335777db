"""Quantized test checkpoints and their references, for the weight-quantization tests.

compressed-tensors checkpoints are written by the compressed-tensors library itself (scheme
applied with apply_quantization_config, scales from its calculate_qparams, quantized and
packed by its ModelCompressor), from a tiny random transformers model; the reference for such
a file is the library's own decompression of it, loaded into transformers.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.core.batch import ScheduledBatch, ScheduledRequest
from engine.models.loader import LoadedModel
from engine.runner.input_prep import prepare_inputs
from engine.runner.kv_memory import KVCacheSpec, allocate_kv_caches
from engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def write_compressed_tensors(
    base_dir: Path, out_dir: Path, *, preset: str, strategy: str, group_size: int | None,
    symmetric: bool = True, storage_format: str | None = None,
) -> Path:
    """The float32 model in `base_dir` quantized by compressed-tensors (`preset` W8A16,
    W4A16 or W8A8, `strategy` channel or group, symmetric or with zero points) into
    `out_dir`, lm_head left unquantized; `storage_format` overrides the library's choice
    (e.g. "pack-quantized" for W8A8, which it writes as "int-quantized")."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights.strategy = strategy
    scheme.weights.group_size = group_size
    scheme.weights.symmetric = symmetric
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "weight_scale"):
                continue
            weight, args = module.weight, module.quantization_scheme.weights
            rows = weight.unflatten(-1, (-1, args.group_size)) if strategy == "group" else (
                weight.unsqueeze(1))
            scale, zero_point = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            if not symmetric:
                module.weight_zero_point.copy_(zero_point.reshape(
                    module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model,
                                                       quantization_format=storage_format)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base_dir / name).is_file():
            (out_dir / name).write_bytes((base_dir / name).read_bytes())
    return out_dir


def library_dequantized_model(base_dir: Path, ct_dir: Path) -> Any:
    """transformers' float32 model of `base_dir` with every quantized weight replaced by the
    compressed-tensors library's decompression of the tensors stored in `ct_dir`."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(raw).config_groups["group_0"]
    state = load_file(ct_dir / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if f"{name}.weight_packed" not in state:
                continue
            local = {key[len(name) + 1:]: value for key, value in state.items()
                     if key.startswith(name + ".") and key.count(".") == name.count(".") + 1}
            decompressed = PackedQuantizationCompressor.decompress(local, scheme)
            module.weight.copy_(decompressed["weight"])
    return model


HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def online_reference_weights(base_dir: Path, method: str, dtype: torch.dtype) -> dict:
    """Each projection (and an untied LM head) of the transformers model (in `dtype`) quantized
    row by row as --quantization `method` does, dequantized to float32. Rows and column groups are
    independent, so per-shard quantization equals quantizing our fused layer."""
    from engine.layers.quantized_linear import (
        LM_HEAD_QUANT,
        ONLINE_SCHEMES,
        dequantize,
        quantize_weight,
    )

    quant = ONLINE_SCHEMES[method]
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    weights = {}
    for name, param in hf.named_parameters():
        # An untied LM head: int8 per channel for both methods (LM_HEAD_QUANT).
        scheme = (LM_HEAD_QUANT if name == "lm_head.weight" and not hf.config.tie_word_embeddings
                  else quant if any(name.endswith(f"{linear}.weight") for linear in HF_LINEARS)
                  else None)
        if scheme is not None:
            source = param.detach().to(dtype)
            group = scheme.group_for(source.shape[1])
            qweight, scale = quantize_weight(source, scheme.bits, group)
            weights[name] = dequantize(qweight, scale, group)
    return weights


def hf_with_weights(base_dir: Path, weights: dict[str, torch.Tensor]) -> Any:
    """transformers' float32 model of `base_dir` with the named Linear weights replaced."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in weights.items():
            params[name].copy_(weight)
    return model


def reference_logits(hf_model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


class PagedSequence:
    """One sequence through our model over the paged cache (random block order)."""

    def __init__(self, loaded: LoadedModel, token_ids: list[int], seed: int) -> None:
        self.loaded = loaded
        self.token_ids = token_ids
        spec = KVCacheSpec(loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, BLOCK_SIZE,
                           loaded.dtype)
        self.kv_caches = allocate_kv_caches(spec, NUM_BLOCKS, loaded.device)
        self.block_ids = random.Random(seed).sample(range(NUM_BLOCKS), NUM_BLOCKS)
        self.num_computed = 0

    def step(self, num_tokens: int) -> torch.Tensor:
        """float32 logits of the next num_tokens rows."""
        request = ScheduledRequest(
            request_id="r", token_ids=self.token_ids, start=self.num_computed,
            num_tokens=num_tokens, block_ids=self.block_ids, sample=False,
            sampling_params=SamplingParams(temperature=0.0),
            num_prompt_tokens=len(self.token_ids),
        )
        inputs = prepare_inputs(ScheduledBatch([request], num_tokens), BLOCK_SIZE,
                                torch.device("cpu"))
        with torch.inference_mode():
            hidden = self.loaded.model(inputs.input_ids, inputs.positions, self.kv_caches,
                                       inputs.attn_metadata)
            logits = self.loaded.model.compute_logits(hidden)
        self.num_computed += num_tokens
        return logits


def greedy_against_reference(
    loaded: LoadedModel, hf_model: Any, prompt: list[int], steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill then `steps` greedy decode steps through ours, feeding our own argmax; returns
    (our logits per step, the reference's logits for the same rows)."""
    sequence = PagedSequence(loaded, list(prompt), seed=2)
    ours = [sequence.step(len(prompt))]
    theirs = [reference_logits(hf_model, prompt)]
    for _ in range(steps):
        sequence.token_ids.append(int(ours[-1][-1].argmax()))
        ours.append(sequence.step(1))
        theirs.append(reference_logits(hf_model, sequence.token_ids)[-1:])
    return ours, theirs


def assert_no_further_than_bf16(
    loaded: LoadedModel, hf: Any, hf_bf16: Any, prompt: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our greedy logits (prefill + 4 steps) against `hf` (the float reference) are no further
    than `hf_bf16` (the same weights in bf16) is, x1.25 + 1e-3 in relative norm; returns (ours,
    the reference's) logits over the same rows."""
    ours, _ = greedy_against_reference(loaded, hf, prompt, steps=4)
    ids = prompt + [int(step[-1].argmax()) for step in ours[:-1]]
    ours_all = torch.cat(ours)
    expected = reference_logits(hf, ids)
    theirs = reference_logits(hf_bf16, ids)
    our_error = float((ours_all - expected).norm() / expected.norm())
    their_error = float((theirs - expected).norm() / expected.norm())
    assert our_error <= 1.25 * their_error + 1e-3, (our_error, their_error)
    return ours_all, expected


def quantize_linear_inputs(hf_model: Any, groups: dict[str, tuple[int, int | None]]) -> None:
    """Forward pre-hooks on transformers' Linear modules whose names end with a key of
    `groups`, where linear_int takes int8 activations for that weight (bits and group size
    the value's; `linear_kernel.int8_activations_apply`): the input rounded as the kernel does,
    per block of 32 columns to round(x / d) * d, d = max |x| / 127 (llama.cpp's Q8_0 blocks)
    in float32. The reference for bf16 models on those kernels."""
    from engine import linear_kernel

    def hook(_module: Any, args: tuple) -> tuple:
        x = args[0]
        blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
        d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
        inverse = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        rounded = torch.round(blocks * inverse) * d
        return (rounded.reshape(x.shape).to(x.dtype), *args[1:])

    for name, module in hf_model.named_modules():
        for suffix, (bits, group) in groups.items():
            if name.endswith(suffix) and isinstance(module, torch.nn.Linear):
                columns = module.in_features
                if linear_kernel.int8_activations_apply(bits, columns, group or columns):
                    module.register_forward_pre_hook(hook)


@pytest.fixture
def exact_int_activations():
    """linear_int on its exact bf16-activation kernel for a test whose bound is stated for it
    (where the native kernels exist): import into a test module and use it by name."""
    from engine import linear_kernel, ops

    previous = (linear_kernel.set_int_activations("bf16") if ops.linear_bf16_available()
                else None)
    yield
    if previous is not None:
        linear_kernel.set_int_activations(previous)
