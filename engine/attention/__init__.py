"""Attention backends over the paged KV cache, looked up by name."""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata, PrefillSequence
from engine.attention.torch_backend import TorchAttentionBackend


def _paged_ops_backend(name: str) -> Callable[[], AttentionBackend]:
    def factory() -> AttentionBackend:
        from engine.attention.cpu_backend import PagedOpsAttentionBackend

        return PagedOpsAttentionBackend(name)

    return factory


def _flash_attn_backend() -> AttentionBackend:
    from engine.attention.flash_backend import FlashAttentionBackend

    return FlashAttentionBackend()


# Name -> factory. Backends with optional native dependencies (CPU kernels, flash-attn) add
# an entry whose factory imports them lazily, so importing this package never needs them.
_BACKEND_FACTORIES: Mapping[str, Callable[[], AttentionBackend]] = MappingProxyType(
    {
        "torch": TorchAttentionBackend,
        # Our csrc kernels through engine.ops; one class, named after the device it serves.
        "cpu_paged": _paged_ops_backend("cpu_paged"),
        "cuda_paged": _paged_ops_backend("cuda_paged"),
        "flash_attn": _flash_attn_backend,
    }
)
# flash-attn's paged KV cache (block_table) needs blocks of a multiple of this many tokens.
FLASH_ATTN_BLOCK_MULTIPLE = 256


def get_attention_backend(name: str) -> AttentionBackend:
    factory = _BACKEND_FACTORIES.get(name)
    if factory is None:
        known = ", ".join(sorted(_BACKEND_FACTORIES))
        raise ValueError(f"unknown attention backend {name!r}; available: {known}")
    return factory()


def available_attention_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKEND_FACTORIES))


def resolve_attention_backend(requested: str, device: torch.device, block_size: int) -> str:
    """"auto" -> a concrete backend name for `device`; other names are checked and returned.

    auto on CPU:  cpu_paged when the native CPU ops build, else torch.
    auto on CUDA: flash_attn when installed and block_size is a multiple of 256, else
                  cuda_paged when the native CUDA ops build, else torch.
    """
    if requested != "auto":
        if requested not in _BACKEND_FACTORIES:
            known = ", ".join(["auto", *sorted(_BACKEND_FACTORIES)])
            raise ValueError(f"unknown attention backend {requested!r}; available: {known}")
        if requested == "flash_attn" and block_size % FLASH_ATTN_BLOCK_MULTIPLE:
            raise ValueError(
                f"attention backend flash_attn needs a block size that is a multiple of "
                f"{FLASH_ATTN_BLOCK_MULTIPLE} (flash-attn's paged KV cache); got {block_size}"
            )
        return requested
    # Imported here: engine.ops imports this package's torch backend.
    from engine import ops

    if device.type == "cuda":
        if (
            importlib.util.find_spec("flash_attn") is not None
            and block_size % FLASH_ATTN_BLOCK_MULTIPLE == 0
        ):
            return "flash_attn"
        return "cuda_paged" if ops.native_available(device) else "torch"
    if device.type == "cpu" and ops.native_available(device):
        return "cpu_paged"
    return "torch"


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PrefillSequence",
    "available_attention_backends",
    "get_attention_backend",
    "resolve_attention_backend",
]
