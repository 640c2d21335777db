"""KV cache groups: which layers share a block table, and which cache tensor each layer uses.

Layers are grouped by attention type (full, or a window of W tokens). Every group has its own
block table per request, so a windowed group can give back the blocks behind its window while
a full group keeps them all. The groups draw from one block pool and have the same number of
layers S (the smallest layer count of any type; a type with more layers is split into several
groups), so a block is one page of S layers whatever group holds it. The cache is S tensors
("slots"); the j-th layer of every group uses slot j, at the block ids its group holds:

    Gemma 2, 4 layers (S F S F):   groups  full [1, 3]   window [0, 2]     S = 2
                                   slot 0: layers 1 and 0    slot 1: layers 3 and 2
    Gemma 3-like, 6 sliding + 2 full (S = 2): full [f0 f1], window [s0 s1] x 3

A model with one attention type is one group of all its layers (S = every layer): the cache
is one tensor per layer, exactly as without groups. A type whose layer count is not a multiple
of S ends with a smaller group, whose unused slots are wasted in its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KVCacheGroups:
    # Per group: its window in tokens (None: full attention). Full groups come first.
    windows: tuple[int | None, ...]
    # Per group: the model's layer indexes it holds, in order (its j-th layer uses slot j).
    layers: tuple[tuple[int, ...], ...]

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def num_slots(self) -> int:
        """Cache tensors to allocate: the most layers of any group."""
        return max((len(layers) for layers in self.layers), default=0)

    @property
    def layer_group(self) -> tuple[int, ...]:
        """The group of each layer, by layer index."""
        return tuple(self._by_layer()[layer][0] for layer in range(self._num_layers()))

    def layer_slots(self, slots: list[T]) -> list[T]:
        """Each layer's cache (one of the S slot tensors), by layer index."""
        by_layer = self._by_layer()
        return [slots[by_layer[layer][1]] for layer in range(self._num_layers())]

    def _num_layers(self) -> int:
        return sum(len(layers) for layers in self.layers)

    def _by_layer(self) -> dict[int, tuple[int, int]]:
        return {
            layer: (group, slot)
            for group, layers in enumerate(self.layers)
            for slot, layer in enumerate(layers)
        }


def kv_cache_groups(layer_windows: tuple[int | None, ...], num_layers: int) -> KVCacheGroups:
    """Groups of the layers whose windows are `layer_windows` (empty: every layer full)."""
    windows = layer_windows or (None,) * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"{len(windows)} layer windows for {num_layers} layers")
    by_type: dict[int | None, list[int]] = {}
    for layer, window in enumerate(windows):
        by_type.setdefault(window, []).append(layer)
    if len(by_type) <= 1:
        window = windows[0] if windows else None
        return KVCacheGroups(windows=(window,), layers=(tuple(range(num_layers)),))
    size = min(len(layers) for layers in by_type.values())
    # Full attention first (the prefix-cache events announce the first group's blocks), then
    # the windows from the narrowest.
    order = sorted(by_type, key=lambda w: (w is not None, w or 0))
    group_windows: list[int | None] = []
    group_layers: list[tuple[int, ...]] = []
    for window in order:
        layers = by_type[window]
        for start in range(0, len(layers), size):
            group_windows.append(window)
            group_layers.append(tuple(layers[start : start + size]))
    return KVCacheGroups(windows=tuple(group_windows), layers=tuple(group_layers))


def blocks_per_request(windows: tuple[int | None, ...], num_tokens: int, block_size: int) -> int:
    """The most blocks one request of `num_tokens` tokens holds at once over all groups: a
    full group every block of its tokens, a windowed group at most the blocks W - 1 earlier
    tokens and the newest one touch (fewer when the request is shorter)."""
    full = -(-num_tokens // block_size)
    total = 0
    for window in windows:
        total += full if window is None else min(full, -(-(window - 1) // block_size) + 1)
    return total
