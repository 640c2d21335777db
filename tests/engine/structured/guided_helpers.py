"""Shared pieces of the guided-decoding tests: bounded schemas a random model can finish, and
checks that decoded outputs match their constraint."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

# Bounded so that random weights finish well within max_tokens: short strings, small
# integers, a short enum array. Five fields, like the benchmark's.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver", "bronze"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "tier", "tags"],
    "additionalProperties": False,
}
# Python's re and the backends' regex engines agree on this one (ASCII classes only).
CODE_REGEX = r"[a-c]{2,5}-[0-9]{2}"
CHOICES = ("yes", "no", "maybe \"quoted\"", "a|b (literal)")
# Compact JSON between tokens, so a random model cannot spend its budget on whitespace.
COMPACT_WHITESPACE = r"[ ]?"


def assert_valid_json(text: str, schema: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(text), schema)


def assert_full_match(text: str, pattern: str) -> None:
    assert re.fullmatch(pattern, text), text
