"""The engine core process is spawned before the serving process loads its tokenizer (both
take seconds, so they overlap); a tokenizer that fails to load leaves no core behind."""
from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from engine.config import EngineConfig, ModelConfig
from engine.frontend.core_client import ProcessCore


def test_a_failing_tokenizer_load_kills_the_spawned_core(tiny_llama_dir: Path) -> None:
    spawned: list[int] = []
    # Servers other tests started are children of this process too.
    before = {child.pid for child in psutil.Process().children()}

    def failing_bos_id() -> int | None:
        # The child exists by now: the tokenizer loads while it imports.
        spawned.extend(child.pid for child in psutil.Process().children()
                       if child.pid not in before)
        raise OSError("tokenizer.json is unreadable")

    config = EngineConfig(model=ModelConfig(str(tiny_llama_dir), dtype="float32"))
    with pytest.raises(OSError, match="unreadable"):
        ProcessCore(config, failing_bos_id)
    assert spawned, "the core process was not spawned before the tokenizer loaded"
    alive = [pid for pid in spawned if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
