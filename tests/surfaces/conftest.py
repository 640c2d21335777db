"""One running `engine-serve --role all` shared by the REST-surface tests (CORS, tokenize,
served model names), so the suite pays for one model load instead of three."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_process import EngineProcess, start_engine
from surface_names import ALIAS_NAME, API_KEY, GOOD_ORIGIN, MAIN_NAME


@pytest.fixture(scope="session")
def surfaces_server(tiny_llama_dir: Path) -> Iterator[EngineProcess]:
    server = start_engine(
        tiny_llama_dir,
        "--served-model-name", MAIN_NAME, ALIAS_NAME,
        "--allowed-origins", f'["{GOOD_ORIGIN}"]',
        "--api-key", API_KEY,
        "--disable-fastapi-docs",
        role="all",
    )
    try:
        yield server
    finally:
        server.stop()
