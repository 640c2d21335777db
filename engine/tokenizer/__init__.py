"""Tokenizer, chat templates, incremental detokenization and stop strings."""
from __future__ import annotations

from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.stop_strings import StopStringMatcher
from engine.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "Tokenizer"]
