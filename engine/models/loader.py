"""Load a checkpoint (a local directory or a downloaded hub snapshot) into our model classes."""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import AutoConfig

from engine.attention import get_attention_backend
from engine.config import ModelConfig
from engine.distributed.group import SINGLE, TensorParallel
from engine.errors import ModelLoadError
from engine import ops, quantized_ops
from engine.layers.linear import prepack_cpu_linears
from engine.layers.quant.checkpoint_formats import (
    CheckpointTranslator,
    attach_input_perms,
    needs_translation,
)
from engine.layers.quant.resolve import resolve_quantization
from engine.layers.quant.encoder import quantize_encoder_linears
from engine.layers.quantized_linear import (
    ONLINE_SCHEMES,
    finalize_quantized_linears,
    quantize_decoder_linears,
)
from engine.layers.rotary import SUPPORTED_ROPE_TYPES, RopeSpec, build_rotary, read_rope_spec
from engine.models.bert import BertModel
from engine.models.decoder import DecoderForCausalLM
from engine.models.gguf_checkpoint import (
    GGUF,
    attach_gguf_lm_head,
    attach_k_quant_linears,
    gguf_quantization,
    iter_gguf,
)
from engine.models.registry import get_model_class, is_generative, supported_architectures
from engine.models.st_config import (
    SentenceTransformersConfig,
    read_sentence_transformers_config,
)
from engine.models.hub import model_directory
from engine.models.weights import fill_dummy_weights, find_checkpoint_files, iter_checkpoint

logger = logging.getLogger(__name__)

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)


@dataclass(frozen=True)
class LoadedModel:
    model: DecoderForCausalLM | BertModel  # eval mode, no grad, weights in `dtype` on `device`
    hf_config: Any  # transformers PretrainedConfig
    model_path: Path
    architecture: str
    dtype: torch.dtype
    device: torch.device
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    # Pooling defaults and length limit from the sentence-transformers files, if any.
    sentence_transformers: SentenceTransformersConfig = SentenceTransformersConfig()

    @property
    def is_generative(self) -> bool:
        return is_generative(self.architecture)


def resolve_model_path(
    model: str, *, revision: str | None = None, download_dir: str | None = None,
    load_format: str = "auto",
) -> Path:
    """A local directory as is; a hub id from the HF cache, downloaded there first when it
    is missing (engine/models/hub.py)."""
    return model_directory(model, revision=revision, download_dir=download_dir,
                           load_format=load_format)


def load_model(
    model_config: ModelConfig, *, attention_backend: str = "torch", tp: TensorParallel = SINGLE
) -> LoadedModel:
    """`tp`: load this tensor-parallel rank's slice of every weight (decoders only)."""
    model_path = resolve_model_path(
        model_config.model, revision=model_config.revision,
        download_dir=model_config.download_dir, load_format=model_config.load_format)
    architecture = _read_architecture(model_path)
    model_class = get_model_class(architecture)
    assert model_class is not None  # checked by _read_architecture
    dummy = model_config.load_format == "dummy"
    weight_format, weight_files = ("dummy", []) if dummy else find_checkpoint_files(
        model_path, model_config.load_format)
    hf_config = _read_hf_config(model_path)
    generative = is_generative(architecture)
    if generative:
        _check_rope(hf_config, model_path)
    device = resolve_device(model_config.device)
    dtype = resolve_dtype(model_config.dtype, hf_config, device)
    # Encoders whose position table starts past a padding row (RoBERTa) fit fewer tokens.
    offset = model_class.position_offset(hf_config) if hasattr(model_class, "position_offset") else 0
    max_model_len = resolve_max_model_len(
        model_config.max_model_len, hf_config, model_path, position_offset=offset)
    st_config = read_sentence_transformers_config(model_path)
    if model_config.max_model_len is None and st_config.max_seq_length is not None:
        # The length the embedding model was trained and evaluated at.
        max_model_len = min(max_model_len, st_config.max_seq_length)
    if weight_format == GGUF:
        quant = gguf_quantization(model_config.quantization, weight_files[0])
    else:
        quant = resolve_quantization(model_config.quantization, model_path,
                                     generative=generative, load_format=model_config.load_format)
    stored_quant = quant if quant is not None and quant.method not in ONLINE_SCHEMES else None
    try:
        model = model_class(
            hf_config,
            attn_backend=get_attention_backend(attention_backend),
            max_positions=max_model_len,
            dtype=dtype,
            device=device,
            **({"quantization": stored_quant} if stored_quant is not None else {}),
            **({"tp": tp} if tp.world_size > 1 else {}),
        )
    except ValueError as exc:  # a config variant our implementation does not cover
        raise ModelLoadError(f"cannot serve {model_path}: {exc}") from None
    with torch.no_grad():
        if dummy:
            std = float(getattr(hf_config, "initializer_range", 0.02))
            fill_dummy_weights(model, seed=model_config.seed, std=std)
            logger.info("load format dummy: random weights (std %g), no checkpoint read", std)
        elif weight_format == GGUF:
            model.load_weights(iter_gguf(weight_files[0], hf_config, stored_quant))
        elif stored_quant is not None and needs_translation(stored_quant):
            translator = CheckpointTranslator(stored_quant)
            model.load_weights(translator.translate(iter_checkpoint(weight_format, weight_files)))
            attach_input_perms(model, translator.input_perms, model.dims.renames)
        else:
            model.load_weights(iter_checkpoint(weight_format, weight_files))
    model.eval().requires_grad_(False)
    if quant is not None:
        with torch.no_grad():
            if stored_quant is None and getattr(model, "is_encoder", False):
                quantize_encoder_linears(model, quant)
            elif stored_quant is None:
                quantize_decoder_linears(model, quant)
            use_kernel = (device.type == "cpu" and dtype == torch.bfloat16
                          and ops.linear_bf16_available())
            w8a8_kernel = (device.type == "cpu" and dtype == torch.bfloat16
                           and quantized_ops.linear_w8a8_available())
            count = finalize_quantized_linears(model, use_kernel=use_kernel,
                                               w8a8_kernel=w8a8_kernel)
            native = w8a8_kernel if quant.int8_activations else use_kernel
        logger.info("weights: %s, %d projections int%d (%s)%s, %s", quant.method, count,
                    quant.bits,
                    "per channel" if quant.group_size is None else f"groups of {quant.group_size}",
                    ", int8 activations per token" if quant.int8_activations else "",
                    "native kernels" if native else "dequantized per call in torch")
    if (weight_format == GGUF and not dummy and device.type == "cpu"
            and dtype == torch.bfloat16 and ops.linear_bf16_available()):
        count = attach_k_quant_linears(model, weight_files[0], hf_config)
        logger.info("weights: %d GGUF K-quant projections on the int kernels", count)
        head = attach_gguf_lm_head(model, weight_files[0])
        if head is not None:
            logger.info("weights: GGUF LM head (%s) on the int kernels", head)
    if device.type == "cpu" and dtype == torch.bfloat16:
        prepack_cpu_linears(model)
    dims = model.dims
    eos_token_ids, bos_token_id = _read_special_token_ids(hf_config, model_path)
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        model_path=model_path,
        architecture=architecture,
        dtype=dtype,
        device=device,
        vocab_size=dims.vocab_size,
        max_model_len=max_model_len,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        num_layers=dims.num_layers,
        num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        sentence_transformers=st_config,
    )


def resolve_device(requested: str) -> torch.device:
    """"auto" is the current CUDA device when one is visible, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested} requested but no CUDA device is visible")
    return device


def read_architecture(model: str) -> str:
    """The supported architecture a model directory (or cached hub id) declares."""
    return _read_architecture(resolve_model_path(model))


def _read_architecture(model_path: Path) -> str:
    config_path = model_path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"no config.json in {model_path}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from None
    architectures = raw.get("architectures") or []
    for architecture in architectures:
        if get_model_class(architecture) is not None:
            return str(architecture)
    named = ", ".join(architectures) if architectures else "(none listed)"
    raise ModelLoadError(
        f"unsupported architecture {named} in {config_path}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def _read_hf_config(model_path: Path) -> Any:
    try:
        return AutoConfig.from_pretrained(model_path)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot parse {model_path / 'config.json'}: {first_line}") from None


def _check_rope(hf_config: Any, model_path: Path) -> None:
    """Fail at load, naming the field, rather than at the first forward: the rotary tables of
    each RoPE set are built for two positions with the checkpoint's head size (LongRoPE factor
    lists and partial rotary are checked against it)."""
    config_path = model_path / "config.json"
    for rope_config in _rope_configs(hf_config):
        spec = _read_rope_spec(rope_config, config_path)
        if spec.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"unsupported rope_type {spec.rope_type!r} in {config_path}; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        try:
            build_rotary(rope_config, _rope_head_dim(hf_config), 2, "cpu")
        except ValueError as exc:
            raise ModelLoadError(
                f"invalid {spec.rope_type} rope parameters in {config_path}: {exc}"
            ) from None


def _read_rope_spec(rope_config: Any, config_path: Path) -> RopeSpec:
    try:
        return read_rope_spec(rope_config)
    except ValueError as exc:
        raise ModelLoadError(f"invalid rope parameters in {config_path}: {exc}") from None


def _rope_configs(hf_config: Any) -> list[Any]:
    """One config per RoPE set: Gemma 3 nests one `rope_parameters` dict per layer type."""
    params = getattr(hf_config, "rope_parameters", None)
    nested = (
        isinstance(params, Mapping)
        and bool(params)
        and "rope_type" not in params
        and all(isinstance(value, Mapping) for value in params.values())
    )
    if not nested:
        return [hf_config]
    views = []
    for layer_params in params.values():
        view = copy.copy(hf_config)
        view.rope_parameters = dict(layer_params)
        views.append(view)
    return views


def _rope_head_dim(hf_config: Any) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden = getattr(hf_config, "hidden_size", None)
    heads = getattr(hf_config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return 64  # no head size in the config: check the settings on a typical one


def resolve_dtype(requested: str, hf_config: Any, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CPU (float16 is orders of magnitude slower there) and the
    checkpoint's half-precision dtype on CUDA."""
    if requested != "auto":
        dtype = _DTYPES[requested]
        if dtype == torch.float16 and device.type == "cpu":
            raise ModelLoadError("dtype float16 is not supported on CPU (use bfloat16 or float32)")
        return dtype
    if device.type == "cpu":
        return torch.bfloat16
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype)
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def resolve_max_model_len(
    requested: int | None, hf_config: Any, model_path: Path, *, position_offset: int = 0
) -> int:
    model_limit = int(hf_config.max_position_embeddings) - position_offset
    if requested is not None and requested > model_limit:
        raise ModelLoadError(
            f"max_model_len {requested} exceeds the model's {model_limit} positions "
            f"(max_position_embeddings in {model_path / 'config.json'})"
        )
    return model_limit if requested is None else requested


def _read_special_token_ids(
    hf_config: Any, model_path: Path
) -> tuple[frozenset[int], int | None]:
    eos_token_ids = set(_as_id_list(getattr(hf_config, "eos_token_id", None)))
    bos_token_id = getattr(hf_config, "bos_token_id", None)
    generation_path = model_path / "generation_config.json"
    if generation_path.is_file():
        try:
            generation = json.loads(generation_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {generation_path}: {exc}") from None
        eos_token_ids.update(_as_id_list(generation.get("eos_token_id")))
        if bos_token_id is None:
            bos_token_id = generation.get("bos_token_id")
    return frozenset(eos_token_ids), None if bos_token_id is None else int(bos_token_id)


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(token_id) for token_id in value]
