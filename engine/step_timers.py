"""The native step timers (csrc/cpu/step_timers.h): nanoseconds and calls per region of a
step (qkv, attention, o, gate_up, activation, down, norms, rotary, router, experts, lora,
residual, linear), inside the one native call a fused decode step is. Off by default; off,
a region costs one branch. `linear` is the per-op linear entry point: the LM head during a
fused decode step, every projection during a per-op (prefill) step."""
from __future__ import annotations

from engine import ops


def available() -> bool:
    """True when the CPU native ops are built (and so carry the timers)."""
    return ops._cpu_module() is not None


def enable(on: bool) -> None:
    """Turn the timers on or off process-wide."""
    _module().step_timers_enable(on)


def reset() -> None:
    """Zero every region."""
    _module().step_timers_reset()


def read() -> dict[str, tuple[int, int]]:
    """{region: (nanoseconds, calls)} since the last reset, every region listed."""
    return {name: (int(ns), int(calls)) for name, (ns, calls) in _module().step_timers_read().items()}


def _module():
    module = ops._cpu_module()
    if module is None:
        raise RuntimeError("the native CPU ops are not built: no step timers")
    return module
