"""`--quantization` and the checkpoint's `quantization_config` -> one WeightQuant (or None).

    --quantization       checkpoint unquantized          checkpoint quantized (method M)
    auto (default)       served as stored                 its scheme
    int8 / int4          round-to-nearest at load time    error: already quantized
    M (compressed-tensors, gptq, awq)
                         error: nothing to read           its scheme; another M: error

compressed-tensors (llm-compressor's format, vLLM's main one) is read where our kernels
apply: one config group of Linear targets, "pack-quantized" (or "int-quantized": 8-bit
values stored unpacked), int weights of 4 or 8 bits, symmetric or not, "channel" or "group"
strategy (even group size), no act-order index; input activations either not quantized
(W8A16, W4A16) or, with 8-bit symmetric per-channel weights, dynamic symmetric int8 per token
(W8A8). GPTQ (4 or 8 bits, any group size the kernels take,
desc_act, sym or not, checkpoint_format gptq or gptq_v2) and AWQ (4 bits, version gemm) are
read by quant/checkpoint_formats.py. Anything else is refused naming the field.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError
from engine.layers.quantized_linear import ONLINE_SCHEMES, WeightQuant

COMPRESSED_TENSORS = "compressed-tensors"
CHECKPOINT_METHODS = (COMPRESSED_TENSORS, "gptq", "awq")
# gguf: the model is a GGUF file (models/gguf_checkpoint.py decides its layers).
QUANTIZATION_METHODS = ("auto", "int8", "int4", *CHECKPOINT_METHODS, "gguf")
# Checkpoint module names whose weights become our quantized projections
# (QUANTIZED_PROJECTIONS once fused).
_CHECKPOINT_PROJECTIONS = tuple(
    [f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    + [f"model.layers.0.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")]
)


def resolve_quantization(
    requested: str, model_path: Path, *, generative: bool, load_format: str = "auto"
) -> WeightQuant | None:
    """The WeightQuant to build the model with; raises ModelLoadError naming --quantization or
    the config.json field it cannot serve."""
    if requested not in QUANTIZATION_METHODS:
        raise ModelLoadError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {requested!r}")
    config_path = model_path / "config.json"
    raw = _read_config(config_path)
    stored = raw.get("quantization_config")
    if stored is not None and load_format != "dummy":
        if requested in ONLINE_SCHEMES:
            raise ModelLoadError(
                f"--quantization {requested}: {config_path} is already quantized "
                f"(quantization_config.quant_method "
                f"{_field(stored, 'quant_method')!r}); use --quantization auto")
        if not generative:
            raise ModelLoadError(f"quantized encoder checkpoints are not supported ({config_path})")
        method = _field(stored, "quant_method")
        if requested in CHECKPOINT_METHODS and method != requested:
            raise ModelLoadError(f"--quantization {requested}: {config_path} "
                                 f"quantization_config.quant_method is {method!r}")
        if any(key in raw for key in ("num_local_experts", "num_experts")):
            raise ModelLoadError(f"{config_path} quantization_config: quantized "
                                 "mixture-of-experts checkpoints are not supported yet")
        if method in ("gptq", "awq"):
            return read_gptq_awq(stored, config_path)
        return read_compressed_tensors(stored, raw, config_path)
    if requested in CHECKPOINT_METHODS:
        raise ModelLoadError(f"--quantization {requested}: {config_path} has no "
                             "quantization_config")
    if requested == "gguf":
        raise ModelLoadError(f"--quantization gguf: {model_path} holds no .gguf file")
    if requested in ONLINE_SCHEMES:
        # Encoders too: their layers' projections (layers/quant/encoder.py).
        return ONLINE_SCHEMES[requested]
    return None


def read_compressed_tensors(
    stored: Any, raw: Mapping[str, Any], config_path: Path
) -> WeightQuant:
    where = f"{config_path} quantization_config"
    if not isinstance(stored, Mapping):
        raise ModelLoadError(f"{where} is not an object")
    method = stored.get("quant_method")
    if method != COMPRESSED_TENSORS:
        raise ModelLoadError(f"{where}.quant_method {method!r} is not supported "
                             f"(supported: {', '.join(CHECKPOINT_METHODS)})")
    groups = stored.get("config_groups")
    if not isinstance(groups, Mapping) or len(groups) != 1:
        raise ModelLoadError(f"{where}.config_groups: exactly one group is supported, got "
                             f"{len(groups) if isinstance(groups, Mapping) else groups!r}")
    (group_name, group), = groups.items()
    at = f"{where}.config_groups.{group_name}"
    if not isinstance(group, Mapping):
        raise ModelLoadError(f"{at} is not an object")
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise ModelLoadError(f"{at}.targets must be [\"Linear\"], got {targets!r}")
    weight_format = group.get("format") or stored.get("format")
    if weight_format not in _STORAGE_FORMATS:
        raise ModelLoadError(f"{at}.format {weight_format!r} is not supported "
                             f"(supported: {', '.join(_STORAGE_FORMATS)})")
    if group.get("output_activations") is not None:
        raise ModelLoadError(f"{at}.output_activations: output quantization is not supported")
    _check_ignore(stored.get("ignore") or [], f"{where}.ignore")
    weights = group.get("weights")
    if not isinstance(weights, Mapping):
        raise ModelLoadError(f"{at}.weights is missing")
    quant = _weight_scheme(weights, f"{at}.weights")
    if weight_format == "int-quantized":
        if quant.bits != 8 or quant.asymmetric:
            raise ModelLoadError(f"{at}.weights: format int-quantized is read for 8-bit "
                                 "symmetric weights only")
        quant = replace(quant, unpacked=True)
    activations = group.get("input_activations")
    if activations is None:
        return quant
    _check_int8_token_activations(activations, quant, at)
    return replace(quant, int8_activations=True)


# compressed-tensors storage formats read: 4/8-bit values packed in int32, or int8 as is.
_STORAGE_FORMATS = ("pack-quantized", "int-quantized")


def _check_int8_token_activations(activations: Any, quant: WeightQuant, at: str) -> None:
    """The one activation scheme the W8A8 kernel runs: llm-compressor's W8A8 (dynamic
    symmetric int8 per token, 8-bit symmetric weights per channel)."""
    where = f"{at}.input_activations"
    if not isinstance(activations, Mapping):
        raise ModelLoadError(f"{where} is not an object")
    expected = {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                "dynamic": True}
    for key, value in expected.items():
        if activations.get(key, "int" if key == "type" else None) != value:
            raise ModelLoadError(f"{where}.{key} must be {json.dumps(value)} (W8A8: dynamic "
                                 f"symmetric int8 per token), got {activations.get(key)!r}")
    if quant.bits != 8 or quant.group_size is not None or quant.asymmetric:
        raise ModelLoadError(f"{at}.weights: int8 input activations need 8-bit symmetric "
                             "weights with the channel strategy")


def _weight_scheme(weights: Mapping[str, Any], at: str) -> WeightQuant:
    bits = weights.get("num_bits")
    if bits not in (4, 8):
        raise ModelLoadError(f"{at}.num_bits must be 4 or 8, got {bits!r}")
    if weights.get("type", "int") != "int":
        raise ModelLoadError(f"{at}.type {weights.get('type')!r} is not supported (int only)")
    symmetric = weights.get("symmetric")
    if not isinstance(symmetric, bool):
        raise ModelLoadError(f"{at}.symmetric must be true or false, got {symmetric!r}")
    if weights.get("dynamic"):
        raise ModelLoadError(f"{at}.dynamic: weights must have static scales")
    if weights.get("actorder") not in (None, "static", "weight"):
        raise ModelLoadError(f"{at}.actorder {weights.get('actorder')!r}: act-order group "
                             "indices are not supported yet")
    strategy = weights.get("strategy")
    if strategy == "channel":
        return WeightQuant(bits=bits, group_size=None, method=COMPRESSED_TENSORS,
                           asymmetric=not symmetric)
    if strategy == "group":
        size = weights.get("group_size")
        if not isinstance(size, int) or size < 2 or size % 2:
            raise ModelLoadError(f"{at}.group_size must be an even integer >= 2, got {size!r}")
        return WeightQuant(bits=bits, group_size=size, method=COMPRESSED_TENSORS,
                           asymmetric=not symmetric)
    raise ModelLoadError(f"{at}.strategy {strategy!r} is not supported (channel or group)")


def read_gptq_awq(stored: Mapping[str, Any], config_path: Path) -> WeightQuant:
    """GPTQ (gptqmodel / auto-gptq) and AWQ (autoawq's GEMM) configs: bits, group_size
    (-1: per channel), GPTQ's sym (AWQ's zero_point) and the packing version."""
    method = stored["quant_method"]
    at = f"{config_path} quantization_config"
    bits = stored.get("bits", stored.get("w_bit"))
    if bits not in ((4, 8) if method == "gptq" else (4,)):
        raise ModelLoadError(f"{at}.bits must be {'4 or 8' if method == 'gptq' else 4} for "
                             f"{method}, got {bits!r}")
    size = stored.get("group_size", stored.get("q_group_size"))
    if not isinstance(size, int) or not (size == -1 or (size >= 4 and size % 4 == 0)):
        raise ModelLoadError(f"{at}.group_size must be -1 or a multiple of 4, got {size!r}")
    group_size = None if size == -1 else size
    if method == "awq":
        version = str(stored.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelLoadError(f"{at}.version {version!r} is not supported (gemm)")
        _check_ignore(stored.get("modules_to_not_convert") or [],
                      f"{at}.modules_to_not_convert")
        if stored.get("zero_point", True) is not True:
            raise ModelLoadError(f"{at}.zero_point: only AWQ's zero-point scheme (true) is "
                                 "supported")
        return WeightQuant(bits=bits, group_size=group_size, method="awq", asymmetric=True)
    checkpoint_format = stored.get("checkpoint_format", "gptq")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ModelLoadError(f"{at}.checkpoint_format {checkpoint_format!r} is not supported "
                             f"({', '.join(GPTQ_FORMATS)})")
    if stored.get("lm_head"):
        raise ModelLoadError(f"{at}.lm_head: a quantized lm_head is not supported")
    if stored.get("dynamic"):
        raise ModelLoadError(f"{at}.dynamic: per-module overrides are not supported")
    return WeightQuant(bits=bits, group_size=group_size, method="gptq",
                       asymmetric=stored.get("sym", True) is False,
                       zero_plus_one=checkpoint_format == "gptq")


# GPTQ's zero-point conventions: "gptq" (v1) stores each zero point minus one, gptq_v2 as is.
GPTQ_FORMATS = ("gptq", "gptq_v2")


def _check_ignore(ignore: Any, at: str) -> None:
    """Every decoder projection must be quantized (q/k/v and gate/up share one layer), so an
    ignore entry may only name other modules (lm_head, routers)."""
    if not isinstance(ignore, list):
        raise ModelLoadError(f"{at} must be a list, got {ignore!r}")
    for entry in ignore:
        if not isinstance(entry, str):
            raise ModelLoadError(f"{at} entries must be strings, got {entry!r}")
        pattern = entry[3:] if entry.startswith("re:") else None
        hit = [name for name in _CHECKPOINT_PROJECTIONS
               if (re.match(pattern, name) if pattern is not None
                   else name == entry or name.endswith("." + entry))]
        if hit:
            raise ModelLoadError(f"{at} entry {entry!r} leaves decoder projections unquantized "
                                 f"(e.g. {hit[0]}); mixed precision is not supported yet")


def _read_config(config_path: Path) -> Mapping[str, Any]:
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    return raw


def _field(stored: Any, key: str) -> Any:
    return stored.get(key) if isinstance(stored, Mapping) else None
