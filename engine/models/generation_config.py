"""Request defaults from the model's generation_config.json, as the reference server applies
them: a request that leaves temperature, top_p, top_k, min_p, repetition_penalty or max_tokens
unset gets the model's value (vLLM's `--generation-config auto`, its default), not the
engine's. `--generation-config vllm` keeps the engine's own defaults; a path reads another
generation_config.json; `--override-generation-config` sets values over either."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# hub, not the loader: engine-serve reads these defaults before it imports torch.
from engine.models.hub import model_directory

# generation_config.json key -> SamplingParams field: the sampling fields the reference reads.
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
SOURCES = ("auto", "vllm")


def generation_defaults(
    source: str, model: str, overrides: dict[str, Any] | None = None
) -> tuple[tuple[str, float | int], ...]:
    """(SamplingParams field, value) pairs, sorted; ValueError (one line) for a file that
    cannot be read or an override that is not a sampling default."""
    values: dict[str, float | int] = {}
    if source != "vllm":
        path = _config_path(source, model)
        if path is not None:
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read {path}: {exc}") from None
            values = {_FIELDS[key]: config[key] for key in _FIELDS
                      if isinstance(config.get(key), int | float)
                      and not isinstance(config.get(key), bool)}
    for key, value in (overrides or {}).items():
        field = _FIELDS.get(key) or (key if key in _FIELDS.values() else None)
        if field is None:
            raise ValueError(f"--override-generation-config: {key!r} is not one of "
                             f"{', '.join(_FIELDS)}")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"--override-generation-config: {key} must be a number")
        values[field] = value
    if values.get("top_k") == -1:  # the reference's "disabled"; the engine's is 0
        values["top_k"] = 0
    return tuple(sorted(values.items()))


def _config_path(source: str, model: str) -> Path | None:
    if source == "auto":
        try:
            directory = model_directory(model)
        except Exception:  # noqa: BLE001 - the model load reports an unusable model itself
            return None
        path = directory / "generation_config.json"
        return path if path.is_file() else None
    path = Path(source).expanduser()
    path = path / "generation_config.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--generation-config {source}: no generation_config.json there")
    return path
