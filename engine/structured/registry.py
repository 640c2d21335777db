"""Grammar backends by name. A backend module is imported only when first used, so an
optional library (xgrammar) that is not installed costs nothing until someone asks for it."""
from __future__ import annotations

import importlib
import importlib.util
from types import MappingProxyType
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError
from engine.structured.grammar import GrammarBackend, TokenizerInfo

if TYPE_CHECKING:
    from engine.structured.constraint import OutputConstraint

DEFAULT_BACKEND = "llguidance"

# name -> (module with the backend class, class name, the library it needs)
_BACKENDS = MappingProxyType({
    "llguidance": ("engine.structured.llguidance_backend", "LLGuidanceBackend", "llguidance"),
    "xgrammar": ("engine.structured.xgrammar_backend", "XGrammarBackend", "xgrammar"),
})


def known_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def is_available(name: str) -> bool:
    entry = _BACKENDS.get(name)
    return entry is not None and importlib.util.find_spec(entry[2]) is not None


def check_backend(name: str, field: str = "constraint.backend") -> None:
    """Raise InvalidRequestError for an unknown backend or one whose library is missing."""
    if name not in _BACKENDS:
        raise InvalidRequestError(
            f"unknown guided decoding backend {name!r} (known: {', '.join(_BACKENDS)})",
            field=field,
        )
    if not is_available(name):
        raise InvalidRequestError(
            f"guided decoding backend {name!r} is not installed on this server "
            f"(pip install {_BACKENDS[name][2]})",
            field=field,
        )


def create_backend(name: str, info: TokenizerInfo) -> GrammarBackend:
    return _backend_class(name)(info)


def validate_with_backend(name: str, constraint: OutputConstraint) -> None:
    """The backend's grammar check without a tokenizer (`GrammarBackend.validate`): raises
    InvalidRequestError naming the constraint's field for a grammar the backend rejects."""
    _backend_class(name).validate(constraint)


def _backend_class(name: str) -> type:
    check_backend(name)
    module_name, class_name, _ = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)
