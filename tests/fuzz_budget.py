"""The fuzz tier's budget: CI runs the base number of examples (a minute or two in all);
`PROTOSERVE_FUZZ_SCALE=50 make test PYTEST_ARGS="-m fuzz"` runs fifty times as many."""
from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("PROTOSERVE_FUZZ_SCALE", "1")))


def examples(base: int) -> int:
    return base * SCALE
