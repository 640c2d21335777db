"""GPTQ and AWQ test checkpoints, written with the formats' documented packing, and their
dequantize-then-matmul references read back from the files.

gptqmodel / auto-gptq and autoawq insist on a GPU to quantize, so the tensors here are
round-to-nearest with each tool's own quantizer formulas (GPTQ's Quantizer.find_params, AWQ's
pseudo_quantize_tensor) and packed as their QuantLinear.pack functions do. The reference
unpacks the saved files bit by bit from the format description, sharing no code with the
engine's loader.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quant_checkpoints import HF_LINEARS

# AutoAWQ's gemm pack: nibble i of each word holds output column AWQ_PACK_ORDER[i] of its 8.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(base_dir / "model.safetensors")


def _finish(base_dir: Path, out_dir: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in state.items()},
              out_dir / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((base_dir / "config.json").read_text())
    raw["quantization_config"] = config
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    for path in base_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(path, out_dir / path.name)
    return out_dir


def gptq_quantize(weight: torch.Tensor, bits: int, group: int, sym: bool, perm: torch.Tensor):
    """GPTQ's Quantizer (min/max over each group, groups taken in `perm` order as desc_act
    does) -> q [out, in] unsigned, scales fp16 [groups, out], zeros [groups, out], g_idx [in]."""
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // group).to(torch.int32)
    groups = -(-in_features // group)
    scales = torch.empty(groups, out_features, dtype=torch.float16)
    zeros = torch.empty(groups, out_features, dtype=torch.int32)
    q = torch.empty(out_features, in_features, dtype=torch.int32)
    for g in range(groups):
        columns = (g_idx == g).nonzero().flatten()
        x = weight[:, columns].double()
        xmin = x.min(1).values.clamp(max=0)
        xmax = x.max(1).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        scale = ((xmax - xmin) / maxq).clamp(min=1e-8).half()
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32) if sym else (
            torch.round(-xmin / scale.double()).to(torch.int32))
        scales[g], zeros[g] = scale, zero
        q[:, columns] = torch.clamp(torch.round(x / scale.double().unsqueeze(1))
                                    + zero.unsqueeze(1), 0, maxq).to(torch.int32)
    return q, scales, zeros, g_idx


def gptq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int, v1: bool):
    """auto-gptq's QuantLinear.pack: qweight [in * bits / 32, out] (row r, value j = input
    r * 32 / bits + j), qzeros [groups, out * bits / 32] (v1 stores zero - 1)."""
    per_word = 32 // bits
    intweight = q.T.contiguous().to(torch.int64)  # [in, out]
    qweight = torch.zeros(intweight.shape[0] // per_word, intweight.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= intweight[row * per_word + j] << (bits * j)
    stored = ((zeros.to(torch.int64) - (1 if v1 else 0)) & (2**bits - 1))
    qzeros = torch.zeros(stored.shape[0], stored.shape[1] // per_word, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= stored[:, col * per_word + j] << (bits * j)
    as_int32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    return as_int32(qweight), as_int32(qzeros)


def write_gptq(base_dir: Path, out_dir: Path, *, bits: int = 4, group_size: int = 128,
               sym: bool = True, desc_act: bool = False, checkpoint_format: str = "gptq",
               seed: int = 0, share_act_order: bool = True) -> Path:
    """`share_act_order` False: every module its own act order (not what GPTQ writes, for the
    refusal test)."""
    state = _base_state(base_dir)
    generator = torch.Generator().manual_seed(seed)
    orders: dict[str, torch.Tensor] = {}
    for name in [n for n in state if n.endswith(tuple(f"{lin}.weight" for lin in HF_LINEARS))]:
        weight = state.pop(name).float()
        in_features = weight.shape[1]
        # desc_act: columns quantized in a (here random) activation order, one per input
        # (GPTQ orders by the input's Hessian: q/k/v share theirs, as do gate/up).
        shared_input = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj")
        shared_input = shared_input.replace("up_proj", "gate_proj") if share_act_order else name
        if shared_input not in orders:
            orders[shared_input] = (torch.randperm(in_features, generator=generator)
                                    if desc_act else torch.arange(in_features))
        perm = orders[shared_input]
        q, scales, zeros, g_idx = gptq_quantize(weight, bits, group_size, sym, perm)
        qweight, qzeros = gptq_pack(q, zeros, bits, v1=checkpoint_format == "gptq")
        module = name[: -len(".weight")]
        state.update({f"{module}.qweight": qweight, f"{module}.qzeros": qzeros,
                      f"{module}.scales": scales, f"{module}.g_idx": g_idx})
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
              "desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format,
              "lm_head": False, "static_groups": False, "true_sequential": True,
              "damp_percent": 0.05, "pack_dtype": "int32"}
    return _finish(base_dir, out_dir, state, config)


def write_awq(base_dir: Path, out_dir: Path, *, group_size: int = 128) -> Path:
    """AutoAWQ's pseudo_quantize_tensor (zero point) and WQLinear_GEMM.pack."""
    state = _base_state(base_dir)
    for name in [n for n in state if n.endswith(tuple(f"{lin}.weight" for lin in HF_LINEARS))]:
        weight = state.pop(name).float()
        out_features, in_features = weight.shape
        grouped = weight.double().reshape(-1, group_size)
        max_val, min_val = grouped.amax(1, keepdim=True), grouped.amin(1, keepdim=True)
        scales = ((max_val - min_val).clamp(min=1e-5) / 15).half()
        zeros = (-torch.round(min_val / scales.double())).clamp(0, 15)
        q = torch.clamp(torch.round(grouped / scales.double()) + zeros, 0, 15)
        q = q.reshape(out_features, in_features).to(torch.int64)
        scales = scales.reshape(out_features, -1).T.contiguous()  # [groups, out]
        zeros = zeros.reshape(out_features, -1).T.contiguous().to(torch.int64)
        module = name[: -len(".weight")]
        state.update({f"{module}.qweight": _awq_pack(q.T), f"{module}.qzeros": _awq_pack(zeros),
                      f"{module}.scales": scales})
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}
    return _finish(base_dir, out_dir, state, config)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] 4-bit values -> int32 [rows, out / 8] in AWQ's interleaved order."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for i, column in enumerate(AWQ_PACK_ORDER):
            packed[:, col] |= values[:, col * 8 + column] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def _nibbles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., W] -> their 32 / bits values, lowest bits first: [..., W, 32 / bits]."""
    shifts = bits * torch.arange(32 // bits, dtype=torch.int64)
    return ((words.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)


def reference_weights(quant_dir: Path) -> dict[str, torch.Tensor]:
    """Each quantized projection of the file dequantized per the format description, as
    float32 [out, in] keyed by its transformers weight name."""
    config = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    bits, method = config["bits"], config["quant_method"]
    v1 = method == "gptq" and config.get("checkpoint_format", "gptq") == "gptq"
    state = load_file(quant_dir / "model.safetensors")
    weights = {}
    for name in [n for n in state if n.endswith(".qweight")]:
        module = name[: -len(".qweight")]
        words, zero_words = state[name], state[f"{module}.qzeros"]
        scales = state[f"{module}.scales"].float()  # [groups, out]
        if method == "gptq":  # qweight [in / per_word, out]: consecutive inputs per word
            q = _nibbles(words, bits).permute(1, 0, 2).reshape(words.shape[1], -1)  # [out, in]
            zeros = _nibbles(zero_words, bits).flatten(1) + (1 if v1 else 0)  # [groups, out]
            g_idx = state[f"{module}.g_idx"].long()
        else:  # awq qweight [in, out / 8]: 8 outputs per word, interleaved
            # Output c of a word sits in its nibble AWQ_PACK_ORDER.index(c).
            order = torch.tensor([AWQ_PACK_ORDER.index(c) for c in range(8)])
            q = _nibbles(words, 4)[..., order].flatten(1).T  # [out, in]
            zeros = _nibbles(zero_words, 4)[..., order].flatten(1)  # [groups, out]
            g_idx = torch.arange(q.shape[1]) // config["group_size"]
        zeros = zeros[:, : q.shape[0]]
        weights[f"{module}.weight"] = (q - zeros.T[:, g_idx]).float() * scales.T[:, g_idx]
    return weights
