"""The built-in demo model: a random-weight Llama served when no `--model` is given."""
from __future__ import annotations

from engine.demo.builder import DEMO_MODEL_NAME, build_demo_model, ensure_demo_model

__all__ = ["DEMO_MODEL_NAME", "build_demo_model", "ensure_demo_model"]
