"""Structured output (guided decoding): constraints, the Grammar protocol, backends and the
compiler that turns a request's constraint into per-choice matcher state."""
from engine.structured.constraint import ConstraintKind, OutputConstraint
from engine.structured.grammar import CompiledGrammar, Grammar, GrammarBackend, TokenizerInfo
from engine.structured.registry import DEFAULT_BACKEND, known_backends

__all__ = [
    "DEFAULT_BACKEND",
    "CompiledGrammar",
    "ConstraintKind",
    "Grammar",
    "GrammarBackend",
    "OutputConstraint",
    "TokenizerInfo",
    "known_backends",
]
