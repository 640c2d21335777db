"""GGUF files (llama.cpp's format) as models: `--model path/to/file.gguf`.

A GGUF file holds everything: hyperparameters and tokenizer in its metadata, tensors under
llama.cpp's names. It is served through a directory standing for it (`gguf_model_directory`):
config.json and the tokenizer files that transformers' GGUF support derives from the metadata,
and model.gguf linking to the file, so the rest of the engine (config, tokenizer, generation
defaults) reads it like any checkpoint directory; a `--tokenizer` directory still wins.

Weights are read with the `gguf` package. When every decoder projection is Q8_0 or every one
is Q4_0, they load natively onto the int8 / int4 kernels (blocks of 32 weights with one fp16
scale: our groups of 32; Q4_0's q - 8 is our signed int4). K-quant projections (Q4_K_M's
Q4_K / Q6_K mix) are dequantized at load and then, in bfloat16 on the AVX512_BF16 kernels,
replaced by their own blocks (`attach_k_quant_linears`, layers/quant/k_quants.py). Any other
type (F16, BF16, F32, other K-quants) and every non-projection tensor (embeddings, output,
norms) is dequantized at load by gguf.quants to the served dtype.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import ModelLoadError
from engine.layers.linear import Linear
from engine.layers.quant.k_quants import KQuantLinear, KQuantRows, unpack_k_quant
from engine.layers.quantized_linear import QuantizedLinear, WeightQuant, pack_int32
from engine.native_build import cache_dir

logger = logging.getLogger(__name__)

LINKED_FILE = "model.gguf"
GGUF = "gguf"
# llama.cpp's per-layer names -> transformers' (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Architectures whose layout we map; llama.cpp permutes Llama's q/k rows for its rotary
# layout (convert_hf_to_gguf's LlamaModel.permute), not Qwen2's.
_ARCHITECTURES = {"llama": True, "qwen2": False}
# The block types the int kernels take natively: type name -> bits.
_NATIVE = {"Q8_0": 8, "Q4_0": 4}
_BLOCK = 32


def gguf_model_directory(gguf_path: Path) -> Path:
    """The directory standing for `gguf_path`, made once per file version (path, size,
    modification time) under the protoserve cache; concurrent processes each build a private
    copy and the first rename wins."""
    gguf_path = gguf_path.expanduser().resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        _write_directory(gguf_path, staging)
        os.rename(staging, target)
    except OSError:  # another process made it first
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
    return target


def _remove_orphans(root: Path) -> None:
    """Directories whose GGUF file is gone (moved, deleted, a test's temporary file) stand for
    nothing any more: removed whenever a new one is made."""
    for entry in root.iterdir():
        link = entry / LINKED_FILE
        if link.is_symlink() and not link.exists():
            shutil.rmtree(entry, ignore_errors=True)


def _write_directory(gguf_path: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    (out / LINKED_FILE).symlink_to(gguf_path)
    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        raise ModelLoadError(f"cannot read the GGUF metadata of {gguf_path}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                             ) from None
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    config.architectures = [architecture] if architecture else None
    config.save_pretrained(out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # noqa: BLE001 - served with --tokenizer instead
        logger.warning("no tokenizer from the GGUF metadata of %s (%s): pass --tokenizer",
                       gguf_path, str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        return
    tokenizer.save_pretrained(out)


def gguf_quantization(requested: str, gguf_path: Path) -> WeightQuant | None:
    """The projections' WeightQuant: int8 / int4 in groups of 32 when every projection is
    Q8_0 / Q4_0, else None (everything dequantized at load)."""
    if requested not in ("auto", GGUF):
        raise ModelLoadError(f"--quantization {requested}: {gguf_path} is a GGUF file "
                             f"(use --quantization auto or gguf)")
    reader = _reader(gguf_path)
    types = {tensor.tensor_type.name for tensor in reader.tensors
             if _is_projection_weight(tensor.name)}
    if len(types) == 1 and (kind := types.pop()) in _NATIVE:
        return WeightQuant(bits=_NATIVE[kind], group_size=_BLOCK, method=GGUF)
    logger.info("GGUF projections in %s: dequantized at load", ", ".join(sorted(types)) or "-")
    return None


def iter_gguf(gguf_path: Path, hf_config: Any, quant: WeightQuant | None
              ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file under its transformers name: projections of the native
    type as QuantizedLinear's weight_packed / weight_scale, everything else as float32."""
    import gguf

    reader = _reader(gguf_path)
    architecture = _architecture(reader, gguf_path)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # llama3 rope factors: the config has them
            continue
        name = _hf_name(tensor.name, gguf_path)
        rows = None
        if _ARCHITECTURES[architecture] and ".attn_q." in tensor.name:
            rows = _unpermute_rows(int(tensor.shape[-1]), heads)
        elif _ARCHITECTURES[architecture] and ".attn_k." in tensor.name:
            rows = _unpermute_rows(int(tensor.shape[-1]), kv_heads)
        kind = tensor.tensor_type.name
        native = (quant is not None and _is_projection_weight(tensor.name)
                  and _NATIVE.get(kind) == quant.bits)
        if native:
            qweight, scale = _native_blocks(np.asarray(tensor.data), kind)
            if rows is not None:
                qweight, scale = qweight[rows], scale[rows]
            module = name[: -len(".weight")]
            yield f"{module}.weight_packed", pack_int32(qweight, _NATIVE[kind])
            yield f"{module}.weight_scale", scale
            continue
        shape = [int(size) for size in reversed(tensor.shape.tolist())]
        try:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(f"{gguf_path}: tensor {tensor.name} has type {kind}, which "
                                 "the gguf package cannot dequantize") from None
        weight = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy
        yield name, weight if rows is None else weight[rows]


# Our fused projections (under model.layers.{i}) and their llama.cpp shards in row order.
_FUSED_SHARDS = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.down_proj": ("ffn_down",),
}
_K_QUANTS = ("Q4_K", "Q6_K")


def attach_k_quant_linears(model: torch.nn.Module, gguf_path: Path, hf_config: Any) -> int:
    """Replace each decoder projection whose shards are all Q4_K / Q6_K by a KQuantLinear of
    the file's blocks (the float Linear loaded first is dropped); returns how many."""
    reader = _reader(gguf_path)
    permuted = _ARCHITECTURES[_architecture(reader, gguf_path)]
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    replaced = 0
    for index, layer in enumerate(model.model.layers):
        for path, shards in _FUSED_SHARDS.items():
            found = [tensors.get(f"blk.{index}.{shard}.weight") for shard in shards]
            if any(t is None or t.tensor_type.name not in _K_QUANTS for t in found):
                continue
            parent_name, _, leaf = path.rpartition(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, leaf)
            if not isinstance(linear, Linear):
                continue
            segments: list[tuple[int, KQuantRows]] = []
            start = 0
            for shard, tensor in zip(shards, found, strict=True):
                values = unpack_k_quant(torch.from_numpy(np.array(tensor.data)),
                                        tensor.tensor_type.name)
                rows = values.qweight.shape[0]
                if permuted and shard in ("attn_q", "attn_k"):
                    values = values.rows(_unpermute_rows(rows, heads if shard == "attn_q"
                                                         else kv_heads))
                if segments and segments[-1][1].kind == values.kind:  # one call for both
                    segments[-1] = (segments[-1][0], KQuantRows.cat([segments[-1][1], values]))
                else:
                    segments.append((start, values))
                start += rows
            setattr(parent, leaf, KQuantLinear(segments, linear.bias))
            replaced += 1
    return replaced


def attach_gguf_lm_head(model: torch.nn.Module, gguf_path: Path) -> str | None:
    """The LM head on the int kernels from the file's own blocks: output.weight (a tied model:
    token_embd.weight) in Q8_0 / Q4_0 as a QuantizedLinear in groups of 32, in Q6_K as a
    KQuantLinear, replacing the float head loaded first (a tied model keeps its embedding
    table for lookups). Returns the type, or None where the head stays as loaded (other
    types, or a model split across ranks)."""
    tp = getattr(model, "tp", None)
    if tp is not None and (tp.world_size > 1 or tp.stage > 0):
        return None
    tensors = {tensor.name: tensor for tensor in _reader(gguf_path).tensors}
    tensor = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if tensor is None:
        return None
    kind = tensor.tensor_type.name
    data = np.asarray(tensor.data)
    head: torch.nn.Module
    if kind in _NATIVE:
        qweight, scale = _native_blocks(data, kind)
        head = QuantizedLinear(qweight.shape[1], qweight.shape[0], bias=False,
                               quant=WeightQuant(bits=_NATIVE[kind], group_size=_BLOCK,
                                                 method=GGUF),
                               dtype=torch.bfloat16, device="cpu")
        assert head.weight_packed is not None and head.weight_scale is not None
        head.weight_packed.data.copy_(pack_int32(qweight, _NATIVE[kind]))
        head.weight_scale.data.copy_(scale)
        head.finalize(use_kernel=True)
    elif kind == "Q6_K":
        head = KQuantLinear([(0, unpack_k_quant(torch.from_numpy(np.array(data)), kind))], None)
    else:
        return None
    model.lm_head = head
    return kind


def _native_blocks(data: np.ndarray, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks (fp16 d, 32 int8 q: w = d q) or Q4_0 blocks (fp16 d, 16 bytes: element j
    in the low nibble of byte j, element j + 16 in its high nibble: w = d (q - 8)) of a
    [rows, bytes] tensor -> signed q int8 [rows, in] and float32 scales [rows, in / 32]."""
    rows = data.shape[0]
    block_bytes = 34 if kind == "Q8_0" else 18
    blocks = torch.from_numpy(np.array(data)).view(rows, -1, block_bytes)  # off the mmap
    scale = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
    payload = blocks[..., 2:].contiguous()
    if kind == "Q8_0":
        qweight = payload.view(torch.int8).reshape(rows, -1)
    else:
        nibbles = torch.cat((payload & 0x0F, payload >> 4), dim=-1).to(torch.int16) - 8
        qweight = nibbles.to(torch.int8).reshape(rows, -1)
    return qweight, scale


def _is_projection_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in _PROJECTIONS and (
        parts[3] == "weight")


def _unpermute_rows(num_rows: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's permute (transformers' reverse_permute_weights): row
    r of the result is row index[r] of the file."""
    dim = num_rows // heads // 2
    index = torch.arange(num_rows).reshape(heads, dim, 2)
    return index.transpose(1, 2).reshape(num_rows)


def _hf_name(name: str, gguf_path: Path) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ModelLoadError(f"{gguf_path}: tensor {name} has no counterpart in our models")


def _architecture(reader: Any, gguf_path: Path) -> str:
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in _ARCHITECTURES:
        raise ModelLoadError(f"{gguf_path}: general.architecture {architecture!r} is not "
                             f"supported for GGUF (supported: {', '.join(_ARCHITECTURES)})")
    return architecture


def _reader(gguf_path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {gguf_path}: {exc}") from None
