"""Watching the one-call decode path (engine/models/fused_decode.py) from tests."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from engine.models.fused_decode import FusedDecodeLayers


@contextmanager
def fused_decode_runs(monkeypatch: pytest.MonkeyPatch, fused: bool = True) -> Iterator[list[int]]:
    """The rows of every FusedDecodeLayers.run call made inside the block; with `fused` False
    the path never applies, so every step takes the per-op path (the reference)."""
    calls: list[int] = []
    real_run = FusedDecodeLayers.run

    def counted_run(self, *args):
        calls.append(args[0].shape[0])
        return real_run(self, *args)

    monkeypatch.setattr(FusedDecodeLayers, "run", counted_run)
    if not fused:
        monkeypatch.setattr(FusedDecodeLayers, "applies", lambda self, hidden, metadata: False)
    try:
        yield calls
    finally:
        monkeypatch.undo()
