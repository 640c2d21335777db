"""engine-serve's entry module stays light: argument and port errors, `--help` and
`--role bridge` answer without paying for torch, transformers or the REST framework (the
engine imports torch only once it builds the model; the bridge child imports fastapi)."""
from __future__ import annotations

import subprocess
import sys


def test_the_entry_module_imports_neither_torch_transformers_nor_fastapi() -> None:
    probe = ("import sys, protoserve.cli.serve; "
             "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
