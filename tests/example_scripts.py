"""Scripts under examples/ (not a package) imported by path, for the tests that run them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
LOAD_PICKER = ROOT / "examples/router/load_picker.py"


def load_picker() -> ModuleType:
    """examples/router/load_picker.py as a module."""
    spec = importlib.util.spec_from_file_location("load_picker", LOAD_PICKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module
