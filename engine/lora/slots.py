"""Adapters resident in the runner: `max_cpu_loras` loaded adapters kept in host memory (LRU),
`max_loras` of them in the model's stacked slots (engine/layers/lora.py), and the per-step
mapping of rows to slots.

The scheduler never puts more distinct adapters in one step than there are slots, so every
adapter of a step can be resident at once; a slot is reused least-recently-used first,
never one the current step needs.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager
from collections.abc import Iterator

import torch
from torch import nn

from engine.config import LoRAConfig
from engine.layers.lora import LoRAContext, LoRALinear, LoRAStep, lora_native
from engine.lora.adapter import LoRAAdapter, load_adapter, projection_shapes
from engine.lora.request import LoRARequest
from engine.models.decoder_spec import DecoderSpec


class LoRASlots:
    def __init__(self, model: nn.Module, config: LoRAConfig) -> None:
        """Wraps every fused projection of `model` (a models/decoder.py DecoderForCausalLM,
        its weights loaded) in a LoRALinear."""
        self.config = config
        self.spec: DecoderSpec = model.dims
        self.context = LoRAContext()
        model.lora_context = self.context
        # The model's activation dtype: the norm weights are never quantized.
        dtype = model.model.norm.weight.dtype
        device = model.model.norm.weight.device
        self.device, self.dtype = device, dtype
        self.native = lora_native(dtype, device)
        self.projections: list[dict[str, LoRALinear]] = []
        shapes = projection_shapes(self.spec)
        for layer in model.model.layers:
            wrapped: dict[str, LoRALinear] = {}
            for path, shape in shapes.items():
                owner_name, attr = path.split(".")
                owner = getattr(layer, owner_name)
                if not hasattr(owner, attr):
                    continue  # a mixture-of-experts MLP: no dense projection to adapt
                lora_linear = LoRALinear(
                    getattr(owner, attr), shape.slice_sizes, shape.in_features,
                    max_loras=config.max_loras, max_rank=config.max_lora_rank,
                    context=self.context, dtype=dtype, device=device,
                )
                setattr(owner, attr, lora_linear)
                wrapped[path] = lora_linear
            self.projections.append(wrapped)
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()  # lora_id -> adapter
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, LRU first
        self._free_slots = list(range(config.max_loras))
        # Tensor parallelism: each rank holds its share of every adapter (sharding.py), read
        # against the whole model's shapes; rank 0 tells the others each step's row slots and
        # the adapters it newly placed (on_step), and they place the same ones.
        sharder = getattr(model, "sharder", None)
        self._adapter_spec: DecoderSpec = sharder.spec if sharder is not None else self.spec
        self._share: Callable[..., tuple[torch.Tensor, torch.Tensor]] = (
            sharder.lora_factors if sharder is not None else lambda _p, _i, a, b: (a, b))
        self.on_step: Callable[[list[int], list[tuple[int, LoRARequest]]], None] | None = None
        self._new_loads: list[tuple[int, LoRARequest]] = []

    def preload(self, lora: LoRARequest) -> None:
        """Read `lora` into the host cache now (LoRALoadError if it cannot be), so that a
        directory gone bad since the serving side checked it fails its request on arrival
        rather than a step."""
        self._adapter(lora)

    def _adapter(self, lora: LoRARequest) -> LoRAAdapter:
        adapter = self._loaded.get(lora.lora_id)
        if adapter is None:
            adapter = load_adapter(lora.path, self._adapter_spec, self.config.max_lora_rank)
            self._loaded[lora.lora_id] = adapter
            while len(self._loaded) > self.config.cpu_loras:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(lora.lora_id)
        return adapter

    def _activate(self, lora: LoRARequest, pinned: set[int]) -> int:
        """The slot holding `lora`, loading it there if needed; never evicts a pinned id."""
        slot = self._slot_of.get(lora.lora_id)
        if slot is not None:
            self._slot_of.move_to_end(lora.lora_id)
            return slot
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next(i for i in self._slot_of if i not in pinned)
            slot = self._slot_of.pop(victim)
        self.fill(slot, lora)
        self._new_loads.append((slot, lora))
        self._slot_of[lora.lora_id] = slot
        return slot

    def fill(self, slot: int, lora: LoRARequest) -> None:
        """Write `lora`'s factors (this rank's share of them) into `slot` of every layer."""
        adapter = self._adapter(lora)
        per_layer: list[dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = [
            {} for _ in self.projections
        ]
        for (layer, path, index), factors in adapter.targets.items():
            per_layer[layer].setdefault(path, {})[index] = self._share(
                path, index, factors.a, factors.b)
        for layer, wrapped in enumerate(self.projections):
            for path, lora_linear in wrapped.items():
                lora_linear.set_slot(slot, per_layer[layer].get(path, {}))

    def build_step(
        self, loras: Sequence[LoRARequest | None], row_starts: Sequence[int],
        row_counts: Sequence[int],
    ) -> LoRAStep | None:
        """The step's row -> slot mapping: request i (batch order) owns rows
        [row_starts[i], row_starts[i] + row_counts[i]). None when no row has an adapter."""
        needed = {lora.lora_id for lora in loras if lora is not None}
        if not needed:
            return None
        if len(needed) > self.config.max_loras:
            raise RuntimeError(
                f"{len(needed)} adapters in one step, over max_loras {self.config.max_loras}")
        slots = [-1] * sum(row_counts)  # each row's slot, -1 for base rows
        self._new_loads = []
        for lora, start, count in zip(loras, row_starts, row_counts):
            if lora is not None:
                slots[start : start + count] = [self._activate(lora, needed)] * count
        if self.on_step is not None:  # tensor parallelism: the other ranks do the same
            self.on_step(slots, self._new_loads)
        return self.step_of_rows(slots)

    def step_of_rows(self, slots: list[int]) -> LoRAStep:
        """The LoRAStep of each row's slot (-1: base model), for the kernel in use."""
        if self.native:  # layers/lora.py's kernel reads the slots themselves
            return LoRAStep(whole_batch_slot=None, slot_mask=None,
                            row_slots=torch.tensor(slots, dtype=torch.int32))
        if slots and slots[0] >= 0 and slots.count(slots[0]) == len(slots):
            return LoRAStep(whole_batch_slot=slots[0], slot_mask=None)
        # One-hot over [no adapter, slot 0, slot 1, ...], the first column dropped.
        one_hot = torch.nn.functional.one_hot(
            torch.tensor(slots) + 1, self.config.max_loras + 1)
        mask = one_hot[:, 1:].to(self.dtype)
        return LoRAStep(whole_batch_slot=None, slot_mask=mask.to(self.device, non_blocking=True))

    def step(
        self, loras: Sequence[LoRARequest | None], row_starts: Sequence[int],
        row_counts: Sequence[int],
    ) -> AbstractContextManager[None]:
        """The model's forward pass inside this applies each row's adapter; the step is built
        (and, with tensor parallelism, told to the other ranks) here, before it is entered."""
        return self._active(self.build_step(loras, row_starts, row_counts))

    @contextmanager
    def _active(self, built: LoRAStep | None) -> Iterator[None]:
        self.context.step = built
        try:
            yield
        finally:
            self.context.step = None
