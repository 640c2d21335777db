"""`python -m rest_bridge` = the `engine-bridge` console script."""
from __future__ import annotations

import sys

from rest_bridge.cli import main

if __name__ == "__main__":
    sys.exit(main())
