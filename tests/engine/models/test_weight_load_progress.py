"""Reading a large checkpoint says so: its size before, each shard after, its time at the end,
each line once; a small one reads silently."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.models.weights import iter_safetensors


def _shards(directory: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = directory / f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({f"layer.{i}.weight": torch.full((4, 4), float(i))}, str(path))
        paths.append(path)
    return paths


def _read(paths: list[Path], caplog: pytest.LogCaptureFixture, **kwargs) -> list[str]:
    with caplog.at_level(logging.INFO, logger="engine.models.weights"):
        names = [name for name, _ in iter_safetensors(paths, **kwargs)]
    assert names == ["layer.0.weight", "layer.1.weight", "layer.2.weight"]
    return [record.getMessage() for record in caplog.records]


def test_a_large_checkpoint_reports_its_progress_once_per_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    messages = _read(_shards(tmp_path), caplog, announce_bytes=0)
    assert len(messages) == 4, messages
    assert messages[0].startswith("loading weights: 3 shard(s), ")
    assert messages[1].startswith("loading weights: shard 1/3 done")
    assert messages[2].startswith("loading weights: shard 2/3 done")
    assert messages[3].startswith("loaded weights: ")


def test_a_small_checkpoint_reads_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _read(_shards(tmp_path), caplog) == []
