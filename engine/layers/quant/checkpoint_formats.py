"""GPTQ, AWQ and compressed-tensors asymmetric tensors -> QuantizedLinear's load fields.

QuantizedLinear loads one layout (weight_packed / weight_scale / weight_offset, one row per
output feature, so q/k/v and gate/up shards fuse along dim 0). The other formats pack along
other dims, so each quantized module's tensors are gathered from the checkpoint stream and
rewritten once, before the model's fused loader sees them:

    GPTQ (gptqmodel / auto-gptq)     AWQ (GEMM)                  compressed-tensors asym
    qweight int32 [in / 8, out]      qweight int32 [in, out / 8]  weight_packed (as is)
      8 inputs per word, in order      8 outputs per word, in      weight_scale (as is)
                                       AWQ's order 0 2 4 6 1 3 5 7
    qzeros int32 [groups, out / 8]   qzeros int32 [groups, out/8] weight_zero_point int32
      zero - 1 for checkpoint_format   same order as qweight         [out * bits / 32, groups]
      "gptq" (v1), zero for gptq_v2                                  (packed along dim 0)
    scales fp16 [groups, out]        scales fp16 [groups, out]
    g_idx int32 [in]: group of each
      input column (act order)

and w = (q - zero) * scale for GPTQ / AWQ (q, zero unsigned), (q - zero) * scale for
compressed-tensors (both signed), i.e. our q * scale + offset with offset = -zero * scale
after moving q to our signed range.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.errors import ModelLoadError
from engine.layers.quantized_linear import QuantizedLinear, WeightQuant, pack_int32

# Which tensors make up one quantized module, per format (the first ones are required).
_MODULE_TENSORS = {
    "gptq": (("qweight", "qzeros", "scales"), ("g_idx",)),
    "awq": (("qweight", "qzeros", "scales"), ()),
    "compressed-tensors": (("weight_packed", "weight_scale", "weight_zero_point"),
                           ("weight_shape",)),
}
# AWQ's GEMM packing puts output column AWQ_ORDER[i] of each 8 in nibble i.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Checkpoint projections -> the fused layer holding them (models/decoder.py fuses the same).
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def needs_translation(quant: WeightQuant | None) -> bool:
    return quant is not None and (quant.method in ("gptq", "awq") or quant.unpacked or (
        quant.method == "compressed-tensors" and quant.asymmetric))


class CheckpointTranslator:
    """Rewrites a checkpoint stream's quantized modules into QuantizedLinear's fields; other
    tensors pass through. `input_perms` (checkpoint module name -> column order, None for a
    g_idx in plain order) holds what act-order modules need after loading
    (`attach_input_perms`)."""

    def __init__(self, quant: WeightQuant) -> None:
        self.quant = quant
        # int-quantized (symmetric) modules need nothing gathered (handled in `translate`).
        self.required, optional = ((), ()) if quant.unpacked else _MODULE_TENSORS[quant.method]
        self.parts = self.required + optional
        self.input_perms: dict[str, torch.Tensor | None] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def translate(self, tensors: Iterable[tuple[str, torch.Tensor]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            module, _, part = name.rpartition(".")
            if self.quant.unpacked and part == "weight" and tensor.dtype == torch.int8:
                # "int-quantized": the int8 values as they are; unquantized modules'
                # float weights pass through.
                yield f"{module}.weight_packed", pack_int32(tensor, 8)
                continue
            if part not in self.parts:
                yield name, tensor
                continue
            held = self._pending.setdefault(module, {})
            held[part] = tensor
            if len(held) == len(self.parts):
                yield from self._emit(module, self._pending.pop(module))
        for module, held in self._pending.items():
            missing = [part for part in self.required if part not in held]
            if missing:
                raise ModelLoadError(f"checkpoint has {', '.join(sorted(held))} of {module} "
                                     f"but no {module}.{missing[0]}")
            yield from self._emit(module, held)
        self._pending = {}

    def _emit(self, module: str, held: dict[str, torch.Tensor]
              ) -> Iterator[tuple[str, torch.Tensor]]:
        if self.quant.method == "compressed-tensors":
            scale = held["weight_scale"].float()
            zero = unpack_rows_dim0(held["weight_zero_point"], self.quant.bits, scale.shape[0])
            yield f"{module}.weight_packed", held["weight_packed"]
            yield f"{module}.weight_scale", scale
            yield f"{module}.weight_offset", -zero.float() * scale
            return
        if self.quant.method == "gptq":
            qweight, zero, scale, g_idx = gptq_unpack(held, self.quant.bits,
                                                      self.quant.zero_plus_one)
        else:
            qweight, zero, scale = awq_unpack(held)
            g_idx = None
        in_features = qweight.shape[1]
        group = self.quant.group_for(in_features)
        if g_idx is not None:
            perm = act_order_permutation(g_idx, group, f"{module}.g_idx")
            if perm is not None:
                qweight = qweight[:, perm]
            self.input_perms[module] = perm
        expected_groups = self.quant.groups(in_features)
        if scale.shape[1] != expected_groups:
            raise ModelLoadError(f"{module}.scales has {scale.shape[1]} groups; group size "
                                 f"{group} over {in_features} inputs needs {expected_groups}")
        half = 2 ** (self.quant.bits - 1)
        signed = (qweight.to(torch.int16) - half).to(torch.int8)
        yield f"{module}.weight_packed", pack_int32(signed, self.quant.bits)
        yield f"{module}.weight_scale", scale
        if self.quant.asymmetric:
            # (q - z) s = (q - half) s + (half - z) s
            yield f"{module}.weight_offset", (half - zero.float()) * scale
        elif not torch.equal(zero, torch.full_like(zero, half)):
            raise ModelLoadError(f"{module}.qzeros: a symmetric (sym: true) checkpoint must "
                                 f"store the zero point {half} everywhere")


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> their 32 / bits unsigned values [..., W, 32 / bits], lowest
    bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (words.unsqueeze(-1) >> shifts) & (2**bits - 1)


def gptq_unpack(held: dict[str, torch.Tensor], bits: int, zero_plus_one: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ tensors -> (q [out, in] unsigned, zero [out, groups], scale [out, groups] float32,
    g_idx [in] or None)."""
    qweight, qzeros, scales = held["qweight"], held["qzeros"], held["scales"]
    out_features = qweight.shape[1]
    # [in / per_word, out, per_word] -> [out, in]
    q = unpack_words(qweight, bits).permute(1, 0, 2).reshape(out_features, -1)
    zero = unpack_words(qzeros, bits).reshape(qzeros.shape[0], -1)[:, :out_features].T
    if zero_plus_one:
        zero = zero + 1
    g_idx = held.get("g_idx")
    return q, zero, scales.float().T.contiguous(), None if g_idx is None else g_idx.long()


def awq_unpack(held: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ GEMM tensors -> (q [out, in] unsigned, zero [out, groups], scale [out, groups])."""
    # Nibble i holds column AWQ_ORDER[i]: gather nibble `inverse[c]` for column c.
    inverse = torch.tensor([AWQ_ORDER.index(column) for column in range(8)])

    def columns(words: torch.Tensor) -> torch.Tensor:  # [rows, out / 8] -> [rows, out]
        return unpack_words(words, 4)[..., inverse].reshape(words.shape[0], -1)

    return (columns(held["qweight"]).T, columns(held["qzeros"]).T,
            held["scales"].float().T.contiguous())


def unpack_rows_dim0(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """compressed-tensors' zero points packed along dim 0 ([rows * bits / 32, groups] int32,
    stored as z + 2^(bits - 1)) -> signed z [rows, groups]."""
    values = unpack_words(packed.T.contiguous(), bits).reshape(packed.shape[1], -1)[:, :rows]
    return (values - 2 ** (bits - 1)).T


def act_order_permutation(g_idx: torch.Tensor, group: int, where: str) -> torch.Tensor | None:
    """The column order that makes each group contiguous (None when g_idx is already the
    plain k // group); every group must hold `group` columns, as act-order GPTQ writes."""
    plain = torch.arange(g_idx.numel()) // group
    if torch.equal(g_idx, plain):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], plain):
        raise ModelLoadError(f"{where}: every group must hold {group} input columns")
    return perm


def attach_input_perms(model: nn.Module, perms: dict[str, torch.Tensor | None],
                       renames: Iterable[tuple[str, str]]) -> None:
    """Give each act-order layer its column order; shards fused into one layer (q/k/v, which
    read the same input) must agree on it, a plain-order shard included."""
    by_layer: dict[str, tuple[str, torch.Tensor | None]] = {}
    for module, perm in perms.items():
        for old, new in renames:
            module = module.replace(old, new)
        parent, _, leaf = module.rpartition(".")
        target = f"{parent}.{_FUSED.get(leaf, leaf)}"
        if target in by_layer:
            other, seen = by_layer[target]
            same = seen is None and perm is None or (
                seen is not None and perm is not None and torch.equal(seen, perm))
            if not same:
                raise ModelLoadError(f"{module}.g_idx differs from {other}.g_idx, both of "
                                     f"{target}: fused projections must share their act order")
            continue
        by_layer[target] = (module, perm)
    for target, (module, perm) in by_layer.items():
        if perm is None:
            continue
        try:
            layer = model.get_submodule(target)
        except AttributeError:
            raise ModelLoadError(f"checkpoint g_idx of {module} has no matching layer") from None
        if not isinstance(layer, QuantizedLinear):
            raise ModelLoadError(f"checkpoint g_idx of {module}: {target} is not quantized")
        device = layer.weight_packed.device if layer.weight_packed is not None else "cpu"
        layer.input_perm = perm.to(device)
