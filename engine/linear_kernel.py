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
