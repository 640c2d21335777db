"""SamplingParams field lists, read from the proto descriptor instead of written out.

The bridge (OpenAI body -> proto) and the engine (proto -> engine SamplingParams) both copy
these fields. Deriving the lists from `common.proto` means a plain field added there flows end
to end without editing either side; a field that needs special handling is named by that side
as an exception (`without(...)`), so every special case is visible and checked by
tests/test_sampling_fields.py, which asserts that no proto field is left to neither path.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from google.protobuf.descriptor import FieldDescriptor

from protoserve.v1 import common_pb2

_DESCRIPTOR = common_pb2.SamplingParams.DESCRIPTOR


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


class SamplingFieldLists(NamedTuple):
    """SamplingParams field names by how they are copied, in proto declaration order."""

    # Singular scalars with presence (proto3 `optional`): copied when set, else the default.
    scalar: tuple[str, ...]
    # Repeated scalars: copied when non-empty (empty is the default).
    repeated: tuple[str, ...]
    # Maps: copied when non-empty.
    map: tuple[str, ...]

    def without(self, exceptions: Iterable[str]) -> SamplingFieldLists:
        """These lists less `exceptions`, the fields a caller handles by hand.

        An exception that names no SamplingParams field raises: after a rename in the proto a
        stale name would otherwise keep the renamed field on the plain path unnoticed.
        """
        excluded = frozenset(exceptions)
        unknown = sorted(excluded - set(ALL_FIELDS))
        if unknown:
            raise ValueError(f"not SamplingParams fields: {', '.join(unknown)}")
        return SamplingFieldLists(
            *(tuple(name for name in names if name not in excluded) for names in self)
        )

    def names(self) -> frozenset[str]:
        return frozenset(name for names in self for name in names)


ALL_FIELDS: tuple[str, ...] = tuple(field.name for field in _DESCRIPTOR.fields)

SAMPLING_FIELDS = SamplingFieldLists(
    scalar=tuple(
        f.name for f in _DESCRIPTOR.fields
        if not f.is_repeated and f.has_presence and f.message_type is None
    ),
    repeated=tuple(f.name for f in _DESCRIPTOR.fields if f.is_repeated and f.message_type is None),
    map=tuple(f.name for f in _DESCRIPTOR.fields if _is_map(f)),
)

# Fields of no list (a message field, or a scalar without presence, which could not tell
# "unset" from zero): neither side copies them unless it names them as an exception.
UNCLASSIFIED: tuple[str, ...] = tuple(
    name for name in ALL_FIELDS if name not in SAMPLING_FIELDS.names()
)
