"""Checkpoint reading: safetensors files -> (HF name, tensor) -> our (possibly fused) parameters."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pickle
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import ModelLoadError

_INDEX_FILE = "model.safetensors.index.json"
PT_INDEX_FILE = "pytorch_model.bin.index.json"
# Trainer state saved next to the weights in .bin/.pt form: never part of the checkpoint.
_NOT_WEIGHTS = frozenset(
    {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"}
)
# Checkpoints this large take seconds to read (more from network storage): progress is logged.
ANNOUNCE_BYTES = 2**30

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightLayout:
    """Which checkpoint files a model directory (or a hub repo's file list) holds."""

    load_format: str  # "safetensors" | "pt" | "gguf"
    index_file: str | None  # the shard index, which then decides the shards
    shard_files: tuple[str, ...]  # the format's weight files, when there is no index

    def shards(self, weight_map: Mapping[str, str] | None) -> list[str]:
        """The files to read: those the index's weight_map names, else every shard file
        (a repo may hold other weight files besides the indexed ones, e.g. consolidated
        copies; only the indexed ones are read or downloaded)."""
        if weight_map is not None:
            return sorted(set(weight_map.values()))
        return list(self.shard_files)


def weight_layout(names: Iterable[str], load_format: str, where: str) -> WeightLayout:
    """`load_format` auto: safetensors when there are any, else PyTorch pickles (.bin/.pt);
    safetensors or pt: that format, or a clear error naming what is there instead.
    `names`: the top-level file names (subfolders hold other copies, never read)."""
    top = {name for name in names if "/" not in name}
    safetensors = tuple(sorted(n for n in top if n.endswith(".safetensors")))
    pt_files = tuple(sorted(n for n in top if n.endswith((".bin", ".pt")) and n not in _NOT_WEIGHTS))
    # pytorch_model*.bin is the transformers layout: prefer it over other pickles beside it.
    pt_files = tuple(n for n in pt_files if n.startswith("pytorch_model")) or pt_files
    if load_format in ("auto", "safetensors") and (safetensors or _INDEX_FILE in top):
        return WeightLayout("safetensors", _INDEX_FILE if _INDEX_FILE in top else None, safetensors)
    gguf_files = tuple(sorted(n for n in top if n.endswith(".gguf")))
    if load_format == "auto" and gguf_files:  # a GGUF file's directory (gguf_checkpoint.py)
        if len(gguf_files) > 1:
            raise ModelLoadError(f"{where} holds {len(gguf_files)} GGUF files "
                                 f"({', '.join(gguf_files[:3])}): pass one as the model")
        return WeightLayout("gguf", None, gguf_files)
    if load_format == "safetensors":
        found = f" (it has {', '.join(pt_files[:3])}: use --load-format pt)" if pt_files else ""
        raise ModelLoadError(f"--load-format safetensors: no *.safetensors weights in {where}{found}")
    if pt_files or PT_INDEX_FILE in top:
        return WeightLayout("pt", PT_INDEX_FILE if PT_INDEX_FILE in top else None, pt_files)
    if load_format == "pt":
        raise ModelLoadError(f"--load-format pt: no *.bin or *.pt weights in {where}")
    raise ModelLoadError(f"no *.safetensors weights in {where} (nor *.bin / *.pt)")


def read_weight_map(index_path: Path) -> Mapping[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the shard index {index_path}: {exc!r}") from None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index_path}: weight_map is not an object")
    return weight_map


def find_checkpoint_files(model_dir: Path, load_format: str = "auto") -> tuple[str, list[Path]]:
    """The checkpoint's format and shards: those named by the index when there is one, else
    every file of the format in the directory."""
    names = [path.name for path in model_dir.iterdir()] if model_dir.is_dir() else []
    layout = weight_layout(names, load_format, str(model_dir))
    index_path = model_dir / layout.index_file if layout.index_file else None
    weight_map = read_weight_map(index_path) if index_path is not None else None
    files = [model_dir / name for name in layout.shards(weight_map)]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise ModelLoadError(f"{index_path} names missing shard(s): {', '.join(missing)}")
    if not files:
        raise ModelLoadError(f"{index_path} names no shard files")
    return layout.load_format, files


def find_safetensors_files(model_dir: Path) -> list[Path]:
    return find_checkpoint_files(model_dir, "safetensors")[1]


def iter_checkpoint(
    load_format: str, files: list[Path], *, announce_bytes: int = ANNOUNCE_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    if load_format == "pt":
        return iter_pt_files(files, announce_bytes=announce_bytes)
    return iter_safetensors(files, announce_bytes=announce_bytes)


def iter_pt_files(
    files: list[Path], *, announce_bytes: int = ANNOUNCE_BYTES
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every PyTorch pickle shard, read with `weights_only=True`: a checkpoint
    from the hub is untrusted input, and a full unpickler would run any code it names."""
    total = sum(path.stat().st_size for path in files)
    progress = _LoadProgress(len(files), total) if total >= announce_bytes else None
    for path in files:
        state = _load_pt_shard(path)
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):  # a stray int/str entry is not a weight
                yield name, tensor
        del state
        if progress is not None:
            progress.shard_done(path.stat().st_size)


def _load_pt_shard(path: Path) -> Mapping[str, object]:
    try:
        try:  # zip-format files map lazily instead of reading the whole shard into memory
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-1.6) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read {path}: {first_line}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping its weights
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


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
    every layer and a bf16 forward pass neither overflows nor collapses. A norm whose stored
    weight is an offset (Gemma's, applied as 1 + w) says so with `unit_weight`."""
    generator_device = next(model.parameters()).device
    generator = torch.Generator(device=generator_device).manual_seed(seed)
    unit_weights = {
        f"{name}.weight": float(module.unit_weight)
        for name, module in model.named_modules()
        if hasattr(module, "unit_weight")
    }
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.zero_()
        elif param.dim() == 1:
            param.data.fill_(unit_weights.get(name, 1.0))
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
