"""Names shared by the surfaces conftest and its tests (a conftest is not importable by name
reliably when several exist)."""
from __future__ import annotations

MAIN_NAME = "tiny-main"
ALIAS_NAME = "tiny-alias"
GOOD_ORIGIN = "http://good.example"
API_KEY = "surfaces-key"
