"""Checkpoint reading: safetensors files -> (HF name, tensor) -> our (possibly fused) parameters."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import ModelLoadError

_INDEX_FILE = "model.safetensors.index.json"
# Checkpoints this large take seconds to read (more from network storage): progress is logged.
ANNOUNCE_BYTES = 2**30

logger = logging.getLogger(__name__)


def find_safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: those named by the index when there is one, else every
    `*.safetensors` in the directory."""
    index_path = model_dir / _INDEX_FILE
    if index_path.is_file():
        weight_map: Mapping[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(path) for path in files if not path.is_file()]
        if missing:
            raise ModelLoadError(f"{index_path} names missing shard(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def iter_safetensors(
    files: list[Path], *, announce_bytes: int = ANNOUNCE_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every shard. A checkpoint of `announce_bytes` or more takes seconds to
    read: its size is logged before, its progress after each shard, its time at the end."""
    total = sum(path.stat().st_size for path in files)
    progress = _LoadProgress(len(files), total) if total >= announce_bytes else None
    for path in files:
        try:
            shard_cm = safe_open(str(path), framework="pt", device="cpu")
        except (OSError, SafetensorError) as exc:  # truncated or not a safetensors file
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
        with shard_cm as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)
        if progress is not None:
            progress.shard_done(path.stat().st_size)


class _LoadProgress:
    def __init__(self, num_shards: int, total_bytes: int) -> None:
        self.num_shards, self.total_gib = num_shards, total_bytes / 2**30
        self.shards_done, self.bytes_done = 0, 0
        self.start = time.perf_counter()
        logger.info("loading weights: %d shard(s), %.1f GiB", num_shards, self.total_gib)

    def shard_done(self, size: int) -> None:
        self.shards_done += 1
        self.bytes_done += size
        elapsed = time.perf_counter() - self.start
        if self.shards_done < self.num_shards:
            logger.info("loading weights: shard %d/%d done (%.1f of %.1f GiB, %.0f s)",
                        self.shards_done, self.num_shards, self.bytes_done / 2**30,
                        self.total_gib, elapsed)
        else:
            logger.info("loaded weights: %.1f GiB in %.1f s", self.total_gib, elapsed)


def fill_dummy_weights(model: torch.nn.Module, *, seed: int, std: float) -> None:
    """Random weights in place of a checkpoint, drawn on the parameters' own device: matrices
    and embeddings ~ N(0, std) (the config's initializer_range, as transformers initialises
    them), norm scales 1 and biases 0, so activations keep a trained model's scale through
    every layer and a bf16 forward pass neither overflows nor collapses."""
    generator_device = next(model.parameters()).device
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
        elif param.dim() == 1:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, std, generator=generator)


class FusedWeightLoader:
    """Fills parameters from checkpoint tensors, where some checkpoint tensors are row slices
    of one fused parameter. Every parameter must end up fully covered."""

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        *,
        fused_shards: Mapping[str, tuple[str, int, int]],
        ignored_suffixes: tuple[str, ...] = (),
        ignored_names: tuple[str, ...] = (),
    ) -> None:
        # fused_shards: checkpoint module suffix -> (our module suffix, first row, num rows).
        self._params = params
        self._fused_shards = fused_shards
        self._ignored_suffixes = ignored_suffixes
        self._ignored_names = frozenset(ignored_names)
        self._rows_loaded: dict[str, int] = {}

    def load(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._ignored_names or name.endswith(self._ignored_suffixes):
            return
        target_name, first_row, num_rows = self._resolve(name, tensor)
        param = self._params.get(target_name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name} has no matching model parameter")
        target = param.data[first_row : first_row + num_rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
        self._rows_loaded[target_name] = self._rows_loaded.get(target_name, 0) + num_rows

    def _resolve(self, name: str, tensor: torch.Tensor) -> tuple[str, int, int]:
        module_name, _, param_kind = name.rpartition(".")
        for shard_suffix, (fused_suffix, first_row, num_rows) in self._fused_shards.items():
            if module_name.endswith("." + shard_suffix):
                fused_module = module_name[: -len(shard_suffix)] + fused_suffix
                return f"{fused_module}.{param_kind}", first_row, num_rows
        return name, 0, tensor.shape[0] if tensor.dim() else 1

    def check_complete(self) -> None:
        incomplete = [
            name
            for name, param in self._params.items()
            if self._rows_loaded.get(name, 0) != (param.shape[0] if param.dim() else 1)
        ]
        if incomplete:
            shown = ", ".join(incomplete[:5]) + (" ..." if len(incomplete) > 5 else "")
            raise ModelLoadError(
                f"checkpoint is missing {len(incomplete)} tensor(s) for parameter(s): {shown}"
            )
