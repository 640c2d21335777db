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
