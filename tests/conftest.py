"""Fixtures shared by the whole suite.

Helper modules in tests/ (such as model_factory.py) are imported by bare name,
`from model_factory import build_tiny_model`: tests/ has no __init__.py files, and this
conftest puts its own directory on sys.path before any test module is collected (pytest's
default "prepend" import mode would add it too; doing it here does not depend on that mode).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the factory tokenizer and the ChatML template (read-only)."""
    # Imported here: torch and transformers are heavy, and many test modules need neither.
    from model_factory import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
