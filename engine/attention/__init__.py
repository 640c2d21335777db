"""Attention backends over the paged KV cache, looked up by name."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from engine.attention.backend import AttentionBackend, AttentionMetadata, PrefillSequence
from engine.attention.torch_backend import TorchAttentionBackend

# Name -> factory. Backends with optional native dependencies (CPU kernels, flash-attn) add
# an entry whose factory imports them lazily, so importing this package never needs them.
_BACKEND_FACTORIES: Mapping[str, Callable[[], AttentionBackend]] = MappingProxyType(
    {
        "torch": TorchAttentionBackend,
    }
)


def get_attention_backend(name: str) -> AttentionBackend:
    factory = _BACKEND_FACTORIES.get(name)
    if factory is None:
        known = ", ".join(sorted(_BACKEND_FACTORIES))
        raise ValueError(f"unknown attention backend {name!r}; available: {known}")
    return factory()


def available_attention_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKEND_FACTORIES))


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSequence",
    "available_attention_backends",
    "get_attention_backend",
]
