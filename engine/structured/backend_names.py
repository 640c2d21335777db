"""The guided-decoding backend names clients of the reference server send, served here.

vLLM accepts `guided_decoding_backend` values `auto`, `outlines`, `lm-format-enforcer`,
`xgrammar`, `guidance` and `llguidance`, optionally with options after a colon
(`xgrammar:disable-any-whitespace`). Code written for it sends them routinely, so every one is
accepted and served by the best backend installed here: the one named when it is installed,
else llguidance (which implements the same constraint kinds). Which backend served a
requested name is logged once per name.

Options that change the output are honoured whatever backend serves them:
- `disable-any-whitespace`: JSON without whitespace between tokens;
- `any-whitespace`: JSON with unbounded whitespace (the backends' own default, kept behind an
  option: a random or weak model can write whitespace until max_tokens);
- `disable-additional-properties`: objects of a JSON schema that say nothing about
  additionalProperties get `false`, as the reference's xgrammar backend does;
- `no-fallback`: accepted (nothing here falls back to another backend on failure).

Without an option, JSON constraints allow bounded whitespace (constraint.py's
BOUNDED_JSON_WHITESPACE, applied by the llguidance backend for offline and served requests
alike).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from engine.errors import InvalidRequestError
from engine.structured.constraint import ANY_JSON_WHITESPACE, ConstraintKind, OutputConstraint
from engine.structured.registry import DEFAULT_BACKEND, is_available

logger = logging.getLogger(__name__)

# Reference name -> the backend that serves it when installed (None: the server's choice).
_NAMES: dict[str, str | None] = {
    "auto": None,
    "outlines": None,
    "lm-format-enforcer": None,
    "guidance": "llguidance",
    "llguidance": "llguidance",
    "xgrammar": "xgrammar",
}
_OPTIONS = frozenset({
    "disable-any-whitespace", "any-whitespace", "disable-additional-properties", "no-fallback",
})
_logged: set[str] = set()


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """A requested name resolved: the installed backend that serves it and its options."""

    requested: str
    backend: str
    options: frozenset[str]


def accepted_names() -> tuple[str, ...]:
    return tuple(_NAMES)


def resolve_backend(requested: str, field: str = "constraint.backend") -> BackendChoice:
    """`name[:option,option]` -> the backend serving it; InvalidRequestError naming `field`
    for an unknown name or option."""
    name, _, option_text = requested.strip().partition(":")
    name = name.strip().lower()
    if name not in _NAMES:
        raise InvalidRequestError(
            f"unknown guided decoding backend {name!r} (accepted: {', '.join(_NAMES)}, "
            "optionally with :option,option)", field=field)
    options = frozenset(o.strip() for o in option_text.split(",") if o.strip())
    unknown = sorted(options - _OPTIONS)
    if unknown:
        raise InvalidRequestError(
            f"unknown guided decoding backend option(s) {', '.join(unknown)} (accepted: "
            f"{', '.join(sorted(_OPTIONS))})", field=field)
    if {"disable-any-whitespace", "any-whitespace"} <= options:
        raise InvalidRequestError(
            "disable-any-whitespace and any-whitespace contradict each other", field=field)
    wanted = _NAMES[name]
    backend = wanted if wanted is not None and is_available(wanted) else _best_installed()
    if requested not in _logged and (wanted != backend):
        _logged.add(requested)
        logger.info("guided decoding backend %r is served by %s", requested, backend)
    return BackendChoice(requested, backend, options)


def _best_installed() -> str:
    if is_available(DEFAULT_BACKEND):
        return DEFAULT_BACKEND
    if is_available("xgrammar"):
        return "xgrammar"
    return DEFAULT_BACKEND  # the compiler then reports that it is not installed


def apply_backend(constraint: OutputConstraint, server_default: BackendChoice) -> OutputConstraint:
    """`constraint` with its backend name resolved to an installed backend and the options
    of its name (or, when it names none, of the server's default) applied."""
    choice = (resolve_backend(constraint.backend) if constraint.backend is not None
              else server_default)
    constraint = replace(constraint, backend=choice.backend)
    if constraint.kind not in (ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT):
        return constraint
    if constraint.whitespace_pattern is None:
        if "disable-any-whitespace" in choice.options:
            constraint = replace(constraint, whitespace_pattern="")
        elif "any-whitespace" in choice.options:
            constraint = replace(constraint, whitespace_pattern=ANY_JSON_WHITESPACE)
    if "disable-additional-properties" in choice.options and constraint.json_schema:
        try:
            schema = json.loads(constraint.json_schema)
        except json.JSONDecodeError:
            return constraint  # the backend reports the bad schema, naming the field
        constraint = replace(constraint, json_schema=json.dumps(_closed(schema)))
    return constraint


def _closed(node: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema that does not
    set it (nested schemas included)."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: _closed(value) for key, value in node.items()}
    kind = closed.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        "properties" in closed and isinstance(closed["properties"], dict))
    if is_object and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed
