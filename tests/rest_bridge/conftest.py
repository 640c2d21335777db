"""Bridge fixtures: a scripted gRPC engine in a thread and the real bridge as a subprocess
(`python -m rest_bridge`), both on 127.0.0.1."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from bridge_processes import start_bridge, stop_process_group
from engine_process import starts_servers
from scripted_engine import ScriptedEngine


@pytest.fixture(scope="session")
def scripted_engine() -> Iterator[ScriptedEngine]:
    engine = ScriptedEngine()
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
@starts_servers
def bridge_url(scripted_engine: ScriptedEngine) -> Iterator[str]:
    """Base URL of a bridge in front of the scripted engine."""
    process, base_url = start_bridge(f"127.0.0.1:{scripted_engine.port}")
    yield base_url
    stop_process_group(process)
