"""The sentence-transformers metadata a model directory may carry next to its weights:

    modules.json                  the pipeline, e.g. Transformer -> Pooling -> Normalize
    1_Pooling/config.json         pooling_mode_mean_tokens / _cls_token / _lasttoken
    sentence_bert_config.json     max_seq_length (sentence-transformers truncates there)

Read once at load time; absent or unreadable files mean "no opinion".
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# 1_Pooling/config.json flag -> our pooling type (first match wins, in this order).
_POOLING_FLAGS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_lasttoken", "last"),
)


@dataclass(frozen=True, slots=True)
class SentenceTransformersConfig:
    pooling_type: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None


def read_sentence_transformers_config(model_path: Path) -> SentenceTransformersConfig:
    modules = _read_json(model_path / "modules.json")
    if not isinstance(modules, list):
        return SentenceTransformersConfig(
            max_seq_length=_max_seq_length(model_path),
        )
    pooling_type: str | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            pooling_type = _pooling_type(model_path / str(module.get("path", "")) / "config.json")
        elif kind.endswith(".Normalize"):
            normalize = True
    return SentenceTransformersConfig(pooling_type, normalize, _max_seq_length(model_path))


def _pooling_type(path: Path) -> str | None:
    config = _read_json(path)
    if not isinstance(config, dict):
        return None
    for flag, pooling_type in _POOLING_FLAGS:
        if config.get(flag):
            return pooling_type
    logger.warning("%s names no pooling mode this engine supports; using the default", path)
    return None


def _max_seq_length(model_path: Path) -> int | None:
    config = _read_json(model_path / "sentence_bert_config.json")
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None
