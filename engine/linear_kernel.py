"""Which native kernel `engine.ops.linear_bf16` runs on a CPU with AMX.

The packed panels feed two kernels (csrc/cpu/linear_bf16.cpp): the AVX512_BF16 one, which
streams the weights at memory speed, and an AMX tile one, which does as well when memory
bound and far better once a call has enough rows to be compute bound (batched decode,
prefill). "auto" takes AMX from 4 rows where `amx_available()`, so batch 1 is unchanged;
"avx512" and "amx" pin one, for tests and measurements. The environment variable
PROTOSERVE_LINEAR_KERNEL sets the initial choice of a process.
"""
from __future__ import annotations

from engine import ops

LINEAR_KERNEL_ENV = "PROTOSERVE_LINEAR_KERNEL"
LINEAR_KERNELS = ("auto", "avx512", "amx")


def amx_available() -> bool:
    """True where `linear_bf16` can run its AMX tile kernel: the CPU has AMX-BF16 and the OS
    grants this process the tile state."""
    module = ops._cpu_module()
    return ops.linear_bf16_available() and module is not None and bool(module.has_amx_bf16())


def set_linear_kernel(kernel: str) -> str:
    """Pin `linear_bf16`'s kernel for this process ("auto", "avx512" or "amx"); returns the
    previous choice. ValueError for another name, or for "amx" where `amx_available()` is
    false."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel must be one of {', '.join(LINEAR_KERNELS)}, "
                         f"got {kernel!r}")
    module = ops._cpu_module()
    if module is None or not ops.linear_bf16_available():
        raise RuntimeError("set_linear_kernel needs the native AVX512_BF16 linear kernel")
    return str(module.set_linear_kernel(kernel))


W8A8_KERNELS = ("auto", "vnni", "amx", "scalar")


def set_w8a8_kernel(kernel: str) -> str:
    """Pin `linear_w8a8`'s kernel for this process ("auto", "vnni", "amx" or "scalar", the
    portable C++ that CPUs without AVX512-VNNI run); returns the previous choice. ValueError
    for another name or one this build or CPU cannot run."""
    if kernel not in W8A8_KERNELS:
        raise ValueError(f"w8a8 kernel must be one of {', '.join(W8A8_KERNELS)}, got {kernel!r}")
    module = ops._cpu_module()
    if module is None:
        raise RuntimeError("set_w8a8_kernel needs the native CPU ops")
    return str(module.set_w8a8_kernel(kernel))


def w8a8_kernels() -> tuple[str, ...]:
    """The kernels `linear_w8a8` can run here: scalar always, vnni and amx where built and
    allowed."""
    module = ops._cpu_module()
    if module is None:
        return ()
    return ("scalar", *(("vnni",) if module.has_avx512_vnni() else ()),
            *(("amx",) if module.has_amx_int8() else ()))


INT_ACTIVATIONS_ENV = "PROTOSERVE_INT_ACTIVATIONS"
INT_ACTIVATIONS = ("int8", "bf16")


def set_int_activations(activations: str) -> str:
    """How `linear_int` (int8 / int4 weights, bfloat16 models) multiplies: "int8" quantizes
    the activations per block of 32 columns and runs int8 x int8 dot products (llama.cpp's
    arithmetic for Q8_0 / Q4_0; the default, where `int8_activations_apply`), "bf16" the exact
    W8A16 kernel. Returns the previous choice; PROTOSERVE_INT_ACTIVATIONS sets a process's
    initial one. ValueError for another name."""
    if activations not in INT_ACTIVATIONS:
        raise ValueError(f"int activations must be one of {', '.join(INT_ACTIVATIONS)}, "
                         f"got {activations!r}")
    module = ops._cpu_module()
    if module is None or not ops.linear_bf16_available():
        raise RuntimeError("set_int_activations needs the native AVX512_BF16 linear kernels")
    return str(module.set_int_activations(activations))


def int8_activations_apply(bits: int, in_features: int, group_size: int) -> bool:
    """Whether `linear_int` quantizes the activations to int8 for this weight now: selected,
    built with AVX512-VNNI and VBMI, 8 or 4 bits, in_features and group size multiples of 32
    (Q6_K and other shapes keep the exact bf16 kernel)."""
    module = ops._cpu_module()
    if module is None or not ops.linear_bf16_available():
        return False
    return bool(module.int8_activations_apply(bits, in_features, group_size))
