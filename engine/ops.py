"""The only door to the csrc/ kernels. Every op has a pure-torch fallback, so callers never
check for the extension themselves; they may ask `native_available(device)` to pick a backend.

    op                        CPU (csrc/cpu)        CUDA (csrc/cuda)      elsewhere / no build
    write_kv_cache            native                native                torch index_copy_
    paged_decode_attention    native                native                gather + grouped matmul
    paged_prefill_attention   native                torch fallback        gather + SDPA
    (a sliding window or soft-cap: native on CPU, the torch code on CUDA and elsewhere)
    linear_bf16               native (AVX512, AMX)  -                     (callers keep F.linear)
    linear_int (W8A16, W4A16) native (AVX512_BF16)  -                     (dequantize, F.linear)
    moe_bf16 / lora_bf16      native (AVX512_BF16)  -                     (engine.layers.moe / lora's torch)
    rms_norm / silu_and_mul   native (bf16)         -                     (callers keep torch)
    / rotary_bf16             (W8A8 and GGUF K-quant linears: engine/quantized_ops.py)

The extensions are built on first use (engine.native_build). When a build is impossible
(no compiler, no ninja, a compile error, PROTOSERVE_DISABLE_NATIVE_OPS=1) one warning is
logged per device type and the fallbacks run from then on.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from engine.attention.backend import AttentionMetadata, check_attention_options
from engine.attention.kv_quant import is_quantized
from engine.attention.torch_backend import (
    cached_prefill_attention,
    decode_attention,
    write_kv,
)
from engine.native_build import ExtensionSpec, load_extension

logger = logging.getLogger(__name__)

DISABLE_ENV = "PROTOSERVE_DISABLE_NATIVE_OPS"
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"


def native_available(device: torch.device | str = "cpu") -> bool:
    """True when the native ops for `device` are built and loaded (builds them if needed)."""
    return _module_for(torch.device(device)) is not None


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """key/value [T, num_kv_heads, head_dim] -> kv_cache[2, num_blocks, block_size, ...] at
    the flat slots in `slot_mapping` [T] int64; a negative slot is a padding row (skipped)."""
    module = _cache_module(kv_cache, "write_kv_cache")
    if module is not None:
        module.write_kv_cache(key, value, kv_cache, slot_mapping)
        return
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    write_kv(key, value, kv_cache, slot_mapping)


def paged_decode_attention(
    out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
    block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """out[b] = softmax(scale * q_b K_b^T) V_b for one query token per sequence.

    query/out [B, num_heads, D]; block_tables [B, max_blocks] int32/int64 covering each
    sequence's context_lens[b] tokens (which include the new token, already in the cache).
    `sliding_window` / `soft_cap` as in engine.attention.backend; the CUDA kernel has
    neither, so such calls on CUDA take the torch code; nor `sinks` (CPU and torch only)."""
    windowed = sliding_window is not None or soft_cap is not None
    if windowed:
        check_attention_options(sliding_window, soft_cap)
    module = _cache_module(kv_cache, "paged_decode_attention")
    if module is not None and kv_cache.device.type == "cpu":
        # The kernel's "none" is 0 for both; it reads the sinks as float32.
        module.paged_decode_attention(out, query, kv_cache, block_tables, context_lens, scale,
                                      sliding_window or 0, soft_cap or 0.0,
                                      None if sinks is None else sinks.float().contiguous())
        return
    if module is not None and not windowed and sinks is None:
        module.paged_decode_attention(out, query, kv_cache, block_tables, context_lens, scale)
        return
    metadata = AttentionMetadata(
        block_size=kv_cache.shape[2],
        slot_mapping=torch.empty(0, dtype=torch.int64, device=kv_cache.device),
        num_decode_tokens=query.shape[0],
        decode_block_tables=block_tables.long(),
        decode_context_lens=context_lens,
        decode_mask=None,  # decode_attention derives it from context_lens
        prefills=(),
    )
    out.copy_(decode_attention(query, kv_cache, metadata, scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks))


def paged_prefill_attention(
    out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
    block_table: torch.Tensor, context_start: int, scale: float,
    *,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """One sequence's query rows [q, num_heads, D] at positions [context_start,
    context_start + q) attend causally over positions [0, context_start + q), all read from
    the cache through `block_table` [>= ceil((context_start + q) / block_size)]; with a
    sliding window W, row p sees only positions > p - W; `sinks` as in paged_decode_attention."""
    windowed = sliding_window is not None or soft_cap is not None
    if windowed:
        check_attention_options(sliding_window, soft_cap)
    module = _cache_module(kv_cache, "paged_prefill_attention")
    if module is not None and hasattr(module, "paged_prefill_attention"):
        module.paged_prefill_attention(out, query, kv_cache, block_table, context_start, scale,
                                       sliding_window or 0, soft_cap or 0.0,
                                       None if sinks is None else sinks.float().contiguous())
        return
    if sliding_window is not None and sliding_window >= context_start + query.shape[0]:
        sliding_window = None  # the window holds the whole context
    out.copy_(cached_prefill_attention(query, kv_cache, block_table.long(), context_start,
                                       scale, sliding_window, soft_cap, sinks))


# Output rows per panel of the packed linear weight (linear_bf16.cpp's kPanelRows).
LINEAR_PANEL_ROWS = 16


def linear_bf16_available() -> bool:
    """True where `linear_bf16` runs: a CPU build with the AVX512_BF16 kernels."""
    module = _cpu_module()
    return module is not None and bool(module.has_avx512_bf16())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] (K even) -> the kernel's pair-column panels [ceil(N / 16), K / 2, 16, 2]:
    packed[p, k2, r, j] = W[16 p + r, 2 k2 + j], rows past N zero."""
    out_features, in_features = weight.shape
    if in_features % 2:
        raise ValueError(f"linear_bf16 needs an even in_features, got {in_features}")
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    padded = weight.new_zeros(num_panels * LINEAR_PANEL_ROWS, in_features)
    padded[:out_features] = weight
    return (
        padded.view(num_panels, LINEAR_PANEL_ROWS, in_features // 2, 2)
        .permute(0, 2, 1, 3)
        .contiguous()
    )


def linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x [..., K] bfloat16 . W^T (+ bias) with W packed by `pack_linear_weight`; only call
    where `linear_bf16_available()`."""
    module = _cpu_module()
    assert module is not None
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    module.linear_bf16(out, rows, packed, bias)
    return out.view(*x.shape[:-1], out_features)


def linear_int(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None, out_features: int, bits: int, group_size: int,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bfloat16 . dequant(Q)^T (+ bias), Q, scales (and the asymmetric formats'
    offsets, w = Q * scale + offset) packed by layers/quant/panels.py; only call where
    `linear_bf16_available()`."""
    module = _cpu_module()
    assert module is not None
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    module.linear_int(out, rows, packed, scales, bias, bits, group_size, None, offsets)
    return out.view(*x.shape[:-1], out_features)


def pack_moe_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """Experts' fused [gate; up] weights [E, 2 I, H] -> moe_bf16's panels [E, 2 ceil(I / 16),
    H / 2, 16, 2]: gate and up each padded to whole panels, then interleaved (gate panel q at
    2q, up panel q at 2q + 1) so one work item holds both halves of its silu-and-mul."""
    num_experts, double_inter, hidden = gate_up.shape
    inter = double_inter // 2
    gate = _pack_expert_panels(gate_up[:, :inter])
    up = _pack_expert_panels(gate_up[:, inter:])
    return torch.stack((gate, up), dim=2).view(num_experts, -1, *gate.shape[2:]).contiguous()


def pack_moe_down(down: torch.Tensor) -> torch.Tensor:
    """Experts' down weights [E, H, I] -> [E, ceil(H / 16), I / 2, 16, 2]."""
    return _pack_expert_panels(down)


def _pack_expert_panels(weights: torch.Tensor) -> torch.Tensor:
    """pack_linear_weight of every expert's [N, K] at once: [E, ceil(N / 16), K / 2, 16, 2]."""
    num_experts, out_features, in_features = weights.shape
    if in_features % 2:
        raise ValueError(f"moe_bf16 needs even expert input sizes, got {in_features}")
    num_panels = -(-out_features // LINEAR_PANEL_ROWS)
    padded = weights.new_zeros(num_experts, num_panels * LINEAR_PANEL_ROWS, in_features)
    padded[:, :out_features] = weights
    return (
        padded.view(num_experts, num_panels, LINEAR_PANEL_ROWS, in_features // 2, 2)
        .permute(0, 1, 3, 2, 4)
        .contiguous()
    )


def moe_bf16(
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    intermediate: int,
    round_weighted: bool,
) -> torch.Tensor:
    """One mixture-of-experts layer in one native call: hidden [T, H] bfloat16, expert_ids
    [T, k] int64 and weights [T, k] float32 from the router, experts packed by
    pack_moe_gate_up / pack_moe_down. round_weighted: the weights are bfloat16 values and each
    weighted expert output rounds to bfloat16 (Qwen3-MoE); else fp32 products (Mixtral). Only
    call where `linear_bf16_available()`."""
    module = _cpu_module()
    assert module is not None
    out = torch.empty(hidden.shape, dtype=hidden.dtype)
    module.moe_bf16(out, hidden, expert_ids, weights, gate_up, down, intermediate, round_weighted)
    return out


def lora_bf16(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
              ranks: torch.Tensor, slots: torch.Tensor, slices: tuple[int, ...], rank: int) -> None:
    """out [T, N] += each row's adapter in place (engine.layers.lora's native path)."""
    module = _cpu_module()
    assert module is not None
    module.lora_bf16(out, x, a, b_t, ranks, slots, list(slices), rank)


def fused_pointwise_available(x: torch.Tensor) -> bool:
    """Whether the fused bf16 pointwise ops below run for activations like `x`. Float32 keeps
    the torch expressions: they are the exact reference the float32 tests compare against."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and _cpu_module() is not None


def rms_norm_bf16(
    residual: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of residual [T, H] (after `residual += delta` in place when delta is given)."""
    module = _cpu_module()
    assert module is not None
    out = torch.empty(residual.shape, dtype=residual.dtype)
    module.rms_norm_bf16(out, residual, delta, weight, eps)
    return out


def silu_and_mul_bf16(gate_up: torch.Tensor) -> torch.Tensor:
    module = _cpu_module()
    assert module is not None
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    module.silu_and_mul_bf16(out, gate_up)
    return out


def rotary_bf16_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [T, heads, head_dim] in place; cos/signed_sin [T, 1 or absent, head_dim]."""
    module = _cpu_module()
    assert module is not None
    module.rotary_bf16(x, cos.reshape(x.shape[0], -1), signed_sin.reshape(x.shape[0], -1))
    return x


def decode_layers_available() -> bool:
    module = _cpu_module()
    return module is not None and module.has_avx512_bf16()


def decode_layers_bf16(hidden: torch.Tensor, layers: list, *step_args) -> None:
    """Every decoder layer of a pure-decode bf16 step in one call (engine.models.fused_decode);
    only call where `decode_layers_available()`."""
    module = _cpu_module()
    assert module is not None
    module.decode_layers_bf16(hidden, layers, *step_args)


def _cache_module(kv_cache: torch.Tensor, op: str) -> ModuleType | None:
    """The native module for an op over `kv_cache`, or None for the torch code: an int8 cache
    (attention/kv_quant.py) only where the build lists the op in `int8_kv_cache_ops`."""
    module = _module_for(kv_cache.device)
    if module is not None and is_quantized(kv_cache) and op not in getattr(
            module, "int8_kv_cache_ops", ()):
        return None
    return module


def _module_for(device: torch.device) -> ModuleType | None:
    if device.type == "cpu":
        return _cpu_module()
    if device.type == "cuda":
        return _cuda_module()
    return None


def cpu_extension_spec() -> ExtensionSpec:
    cpu_dir = CSRC_DIR / "cpu"
    return ExtensionSpec(
        name="protoserve_cpu_ops",
        sources=tuple(sorted(cpu_dir.glob("*.cpp"))),
        headers=tuple(sorted(cpu_dir.glob("*.h"))),
        # -march=native turns on AVX-512 (and AVX512_BF16) where the host has them; the key
        # includes the host's CPU flags, so a cache shared between machines stays correct.
        cflags=("-O3", "-march=native", "-fopenmp"),
        ldflags=("-fopenmp",),
    )


def cuda_extension_spec() -> ExtensionSpec:
    cuda_dir = CSRC_DIR / "cuda"
    major, minor = torch.cuda.get_device_capability()
    return ExtensionSpec(
        name="protoserve_cuda_ops",
        sources=(cuda_dir / "bindings.cpp", *sorted(cuda_dir.glob("*.cu"))),
        headers=tuple(sorted(cuda_dir.glob("*.h")) + sorted(cuda_dir.glob("*.cuh"))),
        cflags=("-O3",),
        cuda_cflags=("-O3", "-lineinfo"),
        key_parts=(f"sm_{major}{minor}",),
    )


@functools.cache
def _cpu_module() -> ModuleType | None:
    return _load("CPU", cpu_extension_spec)


@functools.cache
def _cuda_module() -> ModuleType | None:
    if not torch.cuda.is_available():
        return None
    return _load("CUDA", cuda_extension_spec)


def _load(label: str, make_spec: Callable[[], ExtensionSpec]) -> ModuleType | None:
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        logger.warning(
            "native %s ops disabled by %s; using the pure-torch fallbacks", label, DISABLE_ENV
        )
        return None
    try:
        return load_extension(make_spec())
    # Whatever goes wrong (compiler, headers, linker, import, file system), serving goes on.
    except Exception as exc:
        logger.warning(
            "native %s ops unavailable (%s); using the pure-torch fallbacks", label, exc
        )
        if exc.__cause__ is not None:
            logger.debug("native %s ops build output:\n%s", label, exc.__cause__)
        return None


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.ops --build`: build (or find in the cache) the kernels this machine
    can use, so the first served request does not wait for the compiler (scripts/bootstrap)."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m engine.ops", description=main.__doc__)
    parser.add_argument("--build", action="store_true", help="build the CPU (and CUDA) kernels")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ok = True
    for label, available in (("CPU", lambda: native_available("cpu")),
                             ("CUDA", lambda: native_available("cuda"))):
        if label == "CUDA" and not torch.cuda.is_available():
            continue
        start = time.perf_counter()
        if available():
            print(f"{label} kernels ready ({time.perf_counter() - start:.1f} s)")
        else:
            print(f"{label} kernels unavailable: the pure-torch fallbacks will serve")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
