"""Weight-only quantized Linear layers (W8A16, W4A16): integer weights, bfloat16/float32
activations.

On CPU, decode streams every weight once per step, so bytes per weight set its speed; int8
halves them and int4 (with one scale per 128 columns) quarters them.

Storage while loading is compressed-tensors' "pack-quantized" layout, so a checkpoint that
llm-compressor wrote loads tensor for tensor and online quantization fills the same fields:

    weight_packed  int32 [out, ceil(in * bits / 32)]: 32 / bits values per word, lowest bits
                   first, each stored as q + 2^(bits - 1) (unsigned)
    weight_scale   float32 [out, ceil(in / group_size)] (one column: per output channel)

    weight_offset  float32 [out, ceil(in / group_size)], asymmetric schemes only

All have one row per output feature, so q/k/v and gate/up shards fuse along dim 0 into one
layer exactly as unquantized weights do (models/weights.py FusedWeightLoader). The weight is
w[n, k] = q[n, k] * weight_scale[n, g] + weight_offset[n, g], g = k // group_size: offset 0
for symmetric schemes, -zero_point * scale for zero-point formats (GPTQ, AWQ and
compressed-tensors asymmetric, translated into these fields by quant/checkpoint_formats.py).
GPTQ's act-order checkpoints (desc_act) store columns in any group order: their columns are
sorted by group once at load, and `input_perm` gathers the activations' columns to match.

After loading, `finalize_quantized_linears` lays each layer out once for where it runs:
- bfloat16 on a CPU with our AVX512_BF16 kernels: engine.ops.linear_int's panels (integers
  turned into bf16 operands in registers, so memory holds only the packed bytes and scales);
- W8A8 layers (`int8_activations`) in bfloat16 on a CPU with the native ops:
  engine.ops.linear_w8a8's panels (int8 x int8 products, quant/w8a8.py);
- anywhere else (float32, other CPUs, CUDA): int8 values and scales, dequantized to the
  activations' dtype on every call and multiplied by F.linear (the pure-torch reference;
  W8A8 inputs fake-quantized per token first, as compressed-tensors does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engine import ops, quantized_ops
from engine.layers.linear import Linear
from engine.layers.quant.panels import (
    dequantize_first,
    dequantize_panels,
    kernel_supports,
    pack_group_values,
    pack_int_panels,
)
from engine.layers.quant.w8a8 import fake_quantize_per_token, pack_w8a8_panels


@dataclass(frozen=True)
class WeightQuant:
    """How Linear weights are stored: `bits`-bit symmetric integers with one float scale per
    output row and group of `group_size` input columns (None: per output channel)."""

    bits: int  # 8 | 4
    group_size: int | None
    # "int8" / "int4": quantized here at load time; "compressed-tensors", "gptq", "awq": read
    # from the checkpoint.
    method: str
    # Zero points: the layers carry a per-group offset (w = q * scale + offset).
    asymmetric: bool = False
    # GPTQ checkpoint_format "gptq" (v1) stores each zero point minus one.
    zero_plus_one: bool = False
    # W8A8: inputs quantized to int8 per token at run time (compressed-tensors' dynamic
    # "token" input_activations); 8-bit per-channel symmetric weights only.
    int8_activations: bool = False
    # compressed-tensors "int-quantized": int8 values stored unpacked as `weight`.
    unpacked: bool = False

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else -(-in_features // self.group_size)

    def group_for(self, in_features: int) -> int:
        """Columns per scale for a layer of `in_features` inputs."""
        return in_features if self.group_size is None else self.group_size


# --quantization int8 / int4: the layouts llm-compressor's W8A16 / W4A16 presets write
# (per channel; groups of 128).
ONLINE_SCHEMES = {
    "int8": WeightQuant(bits=8, group_size=None, method="int8"),
    "int4": WeightQuant(bits=4, group_size=128, method="int4"),
}

# The decoder projections that are quantized; embeddings and MoE routers stay as they are.
QUANTIZED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Online int8 and int4 also quantize an untied LM head, int8 per output channel in both: decode
# streams it every step like a projection (a tenth of a 0.5B model's bytes), and the output
# layer, the most sensitive to rounding, keeps more than 4 bits as in llama.cpp's Q4 mixes.
# A tied head reads the embedding table and stays as it is.
LM_HEAD_QUANT = WeightQuant(bits=8, group_size=None, method="int8")


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        quant: WeightQuant,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        self.group_size = quant.group_for(in_features)
        words = -(-in_features * quant.bits // 32)
        self.weight_packed: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, words, dtype=torch.int32, device=device),
            requires_grad=False,
        )
        self.weight_scale: nn.Parameter | None = nn.Parameter(
            torch.empty(out_features, quant.groups(in_features), dtype=torch.float32,
                        device=device),
            requires_grad=False,
        )
        self.weight_offset: nn.Parameter | None = (
            nn.Parameter(torch.empty(out_features, quant.groups(in_features),
                                     dtype=torch.float32, device=device), requires_grad=False)
            if quant.asymmetric else None
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        # Act-order checkpoints: input column j of the stored (group-sorted) weight is column
        # input_perm[j] of x. Set after loading (quant/checkpoint_formats.py), else None.
        self.input_perm: torch.Tensor | None = None
        # Set by `finalize`: "int_panels" (engine.ops.linear_int) | "w8a8_panels"
        # (engine.ops.linear_w8a8) | "dequantize" (torch).
        # "int_panels" layers without input_perm also run on the fused decode path
        # (models/fused_decode.py), which calls the same kernel.
        self.packing: str | None = None
        self.panels: torch.Tensor | None = None
        self.panel_scales: torch.Tensor | None = None
        self.panel_offsets: torch.Tensor | None = None
        self.qweight: torch.Tensor | None = None  # int8 [out, in], the torch path
        self.scale: torch.Tensor | None = None  # float32 [out, groups], the torch path
        self.offset: torch.Tensor | None = None  # float32 [out, groups] or None, the torch path

    @classmethod
    def from_weight(cls, linear: Linear, quant: WeightQuant) -> QuantizedLinear:
        """Round-to-nearest quantization of a loaded Linear (online --quantization)."""
        assert linear.weight is not None, "quantize before prepacking"
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    quant=quant, dtype=weight.dtype, device=weight.device)
        # Held as int8 values until `finalize` lays them out: packing them into the
        # checkpoint's int32 words only to unpack them again took most of the load time.
        layer.qweight, layer.scale = quantize_weight(weight, quant.bits, layer.group_size)
        layer.weight_packed = layer.weight_scale = None
        if linear.bias is not None and layer.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] in `dtype` (before finalize too), its
        columns in `input_perm` order where that is set."""
        return dequantize(self._int_values(), self._scale(), self.group_size,
                          self._offset()).to(dtype)

    def finalize(self, use_kernel: bool) -> None:
        """Lay the loaded weight out for forward(); the packed int32 copy is dropped."""
        qweight, scale, offset = self._int_values(), self._scale(), self._offset()
        self.qweight = self.scale = self.offset = None  # the kernel layouts keep no copy
        if use_kernel and self.quant.int8_activations:
            self.panels, self.panel_scales = pack_w8a8_panels(qweight, scale)
            self.packing = "w8a8_panels"
        elif use_kernel:
            self.panels, self.panel_scales = pack_int_panels(
                qweight, scale, self.quant.bits, self.group_size)
            self.panel_offsets = None if offset is None else pack_group_values(offset)
            self.packing = "int_panels"
        else:
            self.qweight, self.scale, self.offset = qweight, scale, offset
            self.packing = "dequantize"
        self.weight_packed = None
        self.weight_scale = None
        self.weight_offset = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.packing == "int_panels":
            assert self.panels is not None and self.panel_scales is not None
            if dequantize_first(x, self.in_features):  # prefill without AMX: compute bound
                weight = dequantize_panels(self.panels, self.panel_scales, self.quant.bits,
                                           self.group_size, self.out_features, self.in_features,
                                           self.panel_offsets)
                return ops.linear_bf16(x, weight, self.bias, self.out_features)
            return ops.linear_int(x, self.panels, self.panel_scales, self.bias, self.out_features,
                                  self.quant.bits, self.group_size, self.panel_offsets)
        if self.packing == "w8a8_panels":
            assert self.panels is not None and self.panel_scales is not None
            return quantized_ops.linear_w8a8(x, self.panels, self.panel_scales, self.bias,
                                   self.out_features)
        if self.quant.int8_activations:
            x = fake_quantize_per_token(x)
        weight = dequantize(self._int_values(), self._scale(), self.group_size,
                            self._offset()).to(x.dtype)
        return F.linear(x, weight, self.bias)

    def _int_values(self) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight
        if self.weight_packed is not None:
            return unpack_int32(self.weight_packed.detach(), self.quant.bits, self.in_features)
        raise RuntimeError("int_panels layers keep no int8 copy of their weight")

    def _scale(self) -> torch.Tensor:
        if self.weight_scale is not None:
            return self.weight_scale.detach()
        if self.scale is not None:
            return self.scale
        raise RuntimeError("int_panels layers keep their scales in panel order only")

    def _offset(self) -> torch.Tensor | None:
        if self.weight_offset is not None:
            return self.weight_offset.detach()
        return self.offset

    def extra_repr(self) -> str:
        group = "channel" if self.quant.group_size is None else f"group={self.group_size}"
        if self.quant.asymmetric:
            group += " asymmetric"
        if self.quant.int8_activations:
            group += " int8 activations per token"
        packed = f", packed={self.packing}" if self.packing is not None else ""
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"int{self.quant.bits} {group}{packed}")


def make_linear(
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device | str,
    quant: WeightQuant | None,
) -> Linear | QuantizedLinear:
    """A decoder projection: quantized from construction when the checkpoint stores it so
    (`quant` from compressed-tensors), else a plain Linear (online quantization replaces it
    after loading: `quantize_decoder_linears`)."""
    if quant is None or quant.method in ONLINE_SCHEMES:
        return Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    return QuantizedLinear(in_features, out_features, bias=bias, quant=quant, dtype=dtype,
                           device=device)


def quantize_decoder_linears(model: nn.Module, quant: WeightQuant) -> int:
    """Replace every decoder projection Linear (QUANTIZED_PROJECTIONS) of a loaded model, and an
    untied `lm_head` (LM_HEAD_QUANT), by its round-to-nearest QuantizedLinear; returns how many
    were replaced."""
    replaced = quantize_named_linears(model, QUANTIZED_PROJECTIONS, quant)
    head = getattr(model, "lm_head", None)
    if isinstance(head, Linear):
        model.lm_head = QuantizedLinear.from_weight(head, LM_HEAD_QUANT)
        replaced += 1
    return replaced


def quantize_named_linears(root: nn.Module, names: tuple[str, ...], quant: WeightQuant) -> int:
    """Replace every Linear under `root` held as an attribute named one of `names` by its
    round-to-nearest QuantizedLinear; returns how many were replaced."""
    replaced = 0
    for parent in list(root.modules()):
        for name in names:
            child = getattr(parent, name, None)
            if isinstance(child, Linear):
                setattr(parent, name, QuantizedLinear.from_weight(child, quant))
                replaced += 1
    return replaced


def finalize_quantized_linears(model: nn.Module, *, use_kernel: bool,
                               w8a8_kernel: bool = False) -> int:
    """`use_kernel`: weight-only layers go onto linear_int; `w8a8_kernel`: W8A8 layers onto
    linear_w8a8 (which also runs, in portable C++, where linear_int cannot)."""
    layers = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    for layer in layers:
        if layer.quant.int8_activations:
            layer.finalize(w8a8_kernel)
        else:
            layer.finalize(use_kernel and kernel_supports(layer.quant.bits, layer.in_features,
                                                          layer.group_size))
    return len(layers)


def quantize_weight(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest, as compressed-tensors computes it: scale = absmax of the
    group / (2^bits - 1) * 2 (so -2^(bits-1) is reachable), q = clamp(round(w / scale)).
    Returns q int8 [out, in] and float32 scales [out, groups]."""
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    padded = weight.new_zeros(out_features, groups * group_size, dtype=torch.float32)
    padded[:, :in_features] = weight.float()
    grouped = padded.view(out_features, groups, group_size)
    scale = grouped.abs().amax(dim=-1) / ((2**bits - 1) / 2)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    limit = 2 ** (bits - 1)
    qweight = torch.round(grouped / scale.unsqueeze(-1)).clamp(-limit, limit - 1)
    return qweight.view(out_features, -1)[:, :in_features].to(torch.int8), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, group_size: int,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """q [out, in] int8 * scale [out, groups] (+ offset [out, groups]) -> float32 [out, in]."""
    columns = qweight.shape[1]
    expanded = scale.float().repeat_interleave(group_size, dim=1)[:, :columns]
    if offset is None:
        return qweight.float() * expanded
    shift = offset.float().repeat_interleave(group_size, dim=1)[:, :columns]
    return torch.addcmul(shift, qweight.float(), expanded)


def pack_int32(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """q [out, in] (signed `bits`-bit values) -> compressed-tensors' int32 words."""
    per_word = 32 // bits
    out_features, in_features = qweight.shape
    words = -(-in_features // per_word)
    unsigned = torch.zeros(out_features, words * per_word, dtype=torch.int64,
                           device=qweight.device)
    unsigned[:, :in_features] = qweight.to(torch.int64) + 2 ** (bits - 1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=qweight.device)
    packed = (unsigned.view(out_features, words, per_word) << shifts).sum(dim=-1)
    # Values >= 2^31 wrap to int32's negative range, as the format stores them.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """compressed-tensors' int32 words [out, words] -> q int8 [out, in_features]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    unsigned = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    values = unsigned.view(packed.shape[0], -1)[:, :in_features] - 2 ** (bits - 1)
    return values.to(torch.int8)
