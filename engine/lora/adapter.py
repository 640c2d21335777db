"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) read into per-target
low-rank factors that fit our fused projections.

A PEFT tensor such as `base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight` names
one checkpoint projection; ours are fused (models/decoder_layers.py), so each target becomes a
slice of one of four projections:

    q/k/v_proj    -> slice 0/1/2 of self_attn.qkv_proj
    o_proj        -> self_attn.o_proj
    gate/up_proj  -> slice 0/1 of mlp.gate_up_proj
    down_proj     -> mlp.down_proj

The scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) is folded into B once,
here. Everything else PEFT can store (DoRA, biases, embeddings, lm_head, modules_to_save) is
refused with an error naming the file and the field or tensor.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidRequestError
from engine.models.decoder_spec import DecoderSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# The fused projection (its module path inside a layer) and the slice each target fills.
FUSED_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_TENSOR_NAME = re.compile(
    r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)


class LoRALoadError(InvalidRequestError):
    """An adapter directory that cannot be served with this base model."""


@dataclass(frozen=True)
class ProjectionShape:
    """One fused projection: its slices' output sizes and its input size."""

    slice_sizes: tuple[int, ...]
    in_features: int


def projection_shapes(spec: DecoderSpec) -> dict[str, ProjectionShape]:
    q = spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    hidden, inter = spec.hidden_size, spec.intermediate_size
    return {
        "self_attn.qkv_proj": ProjectionShape((q, kv, kv), hidden),
        "self_attn.o_proj": ProjectionShape((hidden,), q),
        "mlp.gate_up_proj": ProjectionShape((inter, inter), hidden),
        "mlp.down_proj": ProjectionShape((hidden,), inter),
    }


@dataclass(frozen=True)
class LoRAFactors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scaling folded in


@dataclass(frozen=True)
class LoRAAdapter:
    path: str
    rank: int  # the largest rank of any target
    # (layer index, fused projection, slice) -> factors.
    targets: dict[tuple[int, str, int], LoRAFactors]


def load_adapter(path: str, spec: DecoderSpec, max_rank: int) -> LoRAAdapter:
    """Read and check a PEFT directory against the base model; LoRALoadError names the file
    and the field or tensor at fault."""
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise LoRALoadError(f"LoRA adapter {path!r} has no {CONFIG_FILE}", field="lora_path")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise LoRALoadError(f"{config_path} is not valid JSON: {exc}", field="lora_path") from exc
    scaling_of = _scaling_rule(config, config_path, max_rank)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoRALoadError(f"LoRA adapter {path!r} has no {WEIGHTS_FILE}", field="lora_path")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the caller's error
        raise LoRALoadError(f"{weights_path} cannot be read: {exc}", field="lora_path") from exc
    factors = _pair_factors(tensors, spec, weights_path)
    shapes = projection_shapes(spec)
    targets: dict[tuple[int, str, int], LoRAFactors] = {}
    for (layer, target), (a, b) in factors.items():
        projection, index = FUSED_TARGETS[target]
        shape = shapes[projection]
        rank = a.shape[0]
        expected_a = (rank, shape.in_features)
        expected_b = (shape.slice_sizes[index], rank)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise LoRALoadError(
                f"{weights_path}: layer {layer} {target} has lora_A {tuple(a.shape)} and "
                f"lora_B {tuple(b.shape)}, the base model needs {expected_a} and {expected_b}; "
                f"the adapter was trained for another base model", field="lora_path")
        if rank > max_rank:
            raise LoRALoadError(
                f"{weights_path}: layer {layer} {target} has rank {rank}, over --max-lora-rank "
                f"{max_rank}", field="lora_path")
        targets[(layer, projection, index)] = LoRAFactors(
            a.float().contiguous(), (b.float() * scaling_of(rank)).contiguous()
        )
    if not targets:
        raise LoRALoadError(f"{weights_path} holds no LoRA weights", field="lora_path")
    return LoRAAdapter(path, max(f.a.shape[0] for f in targets.values()), targets)


def _scaling_rule(config: dict[str, Any], config_path: Path, max_rank: int) -> Any:
    """The rank -> scaling rule of this adapter, after refusing what we do not serve."""
    refused = {
        "use_dora": lambda v: bool(v),
        "bias": lambda v: v not in (None, "none"),
        "modules_to_save": lambda v: bool(v),
        "alpha_pattern": lambda v: bool(v),
        "fan_in_fan_out": lambda v: bool(v),
    }
    for key, is_refused in refused.items():
        if is_refused(config.get(key)):
            raise LoRALoadError(
                f"{config_path}: {key}={config[key]!r} is not supported", field="lora_path")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRALoadError(
            f"{config_path}: peft_type {peft_type!r} is not supported (only LORA)", field="lora_path")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise LoRALoadError(f"{config_path}: r must be a positive integer", field="lora_path")
    if rank > max_rank:
        raise LoRALoadError(
            f"{config_path}: r={rank} is over --max-lora-rank {max_rank}", field="lora_path")
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return lambda r: alpha / math.sqrt(r)
    return lambda r: alpha / r


def _pair_factors(
    tensors: dict[str, torch.Tensor], spec: DecoderSpec, weights_path: Path
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for raw_name, tensor in tensors.items():
        name = raw_name.removeprefix("base_model.model.")
        for old, new in spec.renames:
            name = name.replace(old, new)
        match = _TENSOR_NAME.fullmatch(name)
        if match is None or match.group(3) not in FUSED_TARGETS:
            raise LoRALoadError(
                f"{weights_path}: tensor {raw_name!r} targets a module LoRA is not supported on "
                f"(supported: {', '.join(FUSED_TARGETS)} of the decoder layers)",
                field="lora_path")
        layer = int(match.group(1))
        if layer >= spec.num_layers:
            raise LoRALoadError(
                f"{weights_path}: tensor {raw_name!r} names layer {layer}, the base model has "
                f"{spec.num_layers}", field="lora_path")
        if match.group(2) == "mlp" and spec.moe is not None and layer in spec.moe.sparse_layers:
            raise LoRALoadError(
                f"{weights_path}: tensor {raw_name!r} targets a mixture-of-experts MLP, which "
                f"LoRA is not supported on", field="lora_path")
        halves.setdefault((layer, match.group(3)), {})[match.group(4)] = tensor
    pairs = {}
    for (layer, target), pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise LoRALoadError(
                f"{weights_path}: layer {layer} {target} has lora_{''.join(pair)} without its "
                f"other half", field="lora_path")
        pairs[(layer, target)] = (pair["A"], pair["B"])
    return pairs
