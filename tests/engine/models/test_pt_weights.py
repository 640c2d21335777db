"""--load-format pt: torch.load(weights_only=True) over pytorch_model*.bin shards, the
index (pytorch_model.bin.index.json) deciding which; bad files are one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import ModelLoadError
from engine.models.weights import find_checkpoint_files, iter_checkpoint


class NotATensor:
    """A pickled object weights_only refuses to build (it would run arbitrary code)."""


def write_sharded(state: dict[str, torch.Tensor], target: Path) -> None:
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2],
              "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        torch.save({name: state[name] for name in shard_names}, target / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_pt_checkpoint_reads_every_tensor_of_the_index(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    state = load_file(tiny_llama_dir / "model.safetensors")
    write_sharded(state, tmp_path)
    torch.save({"stale": torch.zeros(1)}, tmp_path / "pytorch_model-old.bin")  # not indexed
    (tmp_path / "training_args.bin").write_bytes(b"trainer state")
    load_format, files = find_checkpoint_files(tmp_path, "auto")
    assert load_format == "pt"
    assert [f.name for f in files] == ["pytorch_model-00001-of-00002.bin",
                                       "pytorch_model-00002-of-00002.bin"]
    read = dict(iter_checkpoint(load_format, files))
    assert read.keys() == state.keys()
    assert all(torch.equal(read[name], state[name]) for name in state)


def test_a_pickle_of_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2), "payload": NotATensor()}, tmp_path / "pytorch_model.bin")
    load_format, files = find_checkpoint_files(tmp_path, "pt")
    with pytest.raises(ModelLoadError) as error:
        list(iter_checkpoint(load_format, files))
    message = str(error.value)
    assert "\n" not in message and "pytorch_model.bin" in message


@pytest.mark.parametrize(("load_format", "expected"), [
    ("safetensors", "--load-format safetensors: no *.safetensors weights in"),
    ("pt", "--load-format pt: no *.bin or *.pt weights in"),
    ("auto", "no *.safetensors weights in"),
])
def test_missing_weights_name_the_format(tmp_path: Path, load_format: str, expected: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="weights in") as error:
        find_checkpoint_files(tmp_path, load_format)
    assert expected in str(error.value) and str(tmp_path) in str(error.value)


def test_index_naming_a_missing_shard(tiny_llama_dir: Path, tmp_path: Path) -> None:
    write_sharded(load_file(tiny_llama_dir / "model.safetensors"), tmp_path)
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelLoadError, match="names missing shard"):
        find_checkpoint_files(tmp_path, "pt")
