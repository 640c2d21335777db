"""Checks on the shape of the repository rather than its behaviour.

- Every Python file stays under MAX_LINES lines (generated stubs excepted).
- Import rules hold, read from the source with `ast` (nothing is imported, so a broken module
  cannot hide a violation and torch is never loaded):
    * rest_bridge never imports engine: the bridge must run as a sidecar without it;
    * engine/scheduler and engine/kv_cache never import torch: pure bookkeeping, testable alone;
    * inside engine/, only engine/server imports the generated protoserve.v1 stubs, so the
      contract stays a boundary concern.
  An import under `if TYPE_CHECKING:` counts too: the rules are about dependencies, not about
  what happens to load at run time.
- The committed protoserve/v1 stubs match proto/ (scripts/gen_protos.py --check).
"""
from __future__ import annotations

import fnmatch
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from repo_imports import imported_modules, python_files

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
GENERATED = "protoserve/v1/*_pb2*"


@dataclass(frozen=True)
class ImportRule:
    """Files matching `scope` (and none of `exempt`) must not import `forbidden` or below."""

    scope: str
    forbidden: str
    exempt: tuple[str, ...] = ()

    def applies_to(self, rel_path: str) -> bool:
        return _under(rel_path, self.scope) and not any(_under(rel_path, e) for e in self.exempt)


RULES = [
    ImportRule(scope="rest_bridge", forbidden="engine"),
    # The bridge runs without the engine, so also without the launcher that knows both.
    ImportRule(scope="rest_bridge", forbidden="protoserve.cli"),
    # The engine never depends on the bridge; protoserve/cli is the one place knowing both.
    ImportRule(scope="engine", forbidden="rest_bridge"),
    ImportRule(scope="engine", forbidden="protoserve.cli"),
    # The shared contract package depends on neither side (protoserve/cli aside).
    ImportRule(scope="protoserve", forbidden="engine", exempt=("protoserve/cli",)),
    ImportRule(scope="protoserve", forbidden="rest_bridge", exempt=("protoserve/cli",)),
    # The serving side drives the core; nothing below it reaches back up to the serving side.
    ImportRule(scope="engine", forbidden="engine.frontend",
               exempt=("engine/frontend", "engine/server")),
    ImportRule(scope="engine", forbidden="engine.server", exempt=("engine/server",)),
    ImportRule(scope="engine/scheduler", forbidden="torch"),
    ImportRule(scope="engine/kv_cache", forbidden="torch"),
    ImportRule(scope="engine", forbidden="protoserve.v1", exempt=("engine/server",)),
]


def _under(rel_path: str, directory: str) -> bool:
    return rel_path == directory or rel_path.startswith(directory.rstrip("/") + "/")


def _within(name: str, module: str) -> bool:
    """True when `name` is `module` or a submodule of it ("torch.nn" is within "torch")."""
    return name == module or name.startswith(module + ".")


def import_violations(root: Path, files: list[str], rules: list[ImportRule]) -> list[str]:
    violations: list[str] = []
    for rel_path in files:
        active = [rule for rule in rules if rule.applies_to(rel_path)]
        if not active:
            continue
        source = (root / rel_path).read_text(encoding="utf-8")
        for line, name in imported_modules(source, rel_path):
            violations.extend(
                f"{rel_path}:{line} imports {name} (no {rule.forbidden} under {rule.scope})"
                for rule in active
                if _within(name, rule.forbidden)
            )
    return sorted(set(violations))


def oversized(root: Path, files: list[str], max_lines: int) -> list[str]:
    too_long = []
    for rel_path in files:
        if fnmatch.fnmatch(rel_path, GENERATED):
            continue
        count = len((root / rel_path).read_text(encoding="utf-8").splitlines())
        if count > max_lines:
            too_long.append(f"{rel_path}: {count} lines")
    return too_long


def test_python_files_stay_short() -> None:
    too_long = oversized(ROOT, python_files(ROOT), MAX_LINES)
    assert not too_long, f"split these files (limit {MAX_LINES} lines):\n" + "\n".join(too_long)


def test_import_rules() -> None:
    violations = import_violations(ROOT, python_files(ROOT), RULES)
    assert not violations, "import rules broken:\n" + "\n".join(violations)


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkers_catch_synthetic_violations(tmp_path: Path) -> None:
    """The checkers themselves: every rule fires on a known-bad tree and stays quiet on a good one."""
    sources = {
        "rest_bridge/app.py": "from engine.config import EngineConfig\n",
        "rest_bridge/routes/chat.py": "from ... import engine\n",  # resolves to `engine`
        "rest_bridge/ok.py": "import grpc\nfrom protoserve.v1 import inference_pb2\n",
        "engine/scheduler/policy.py": "import torch.nn as nn\n",
        "engine/kv_cache/pool.py": "def f() -> None:\n    from torch import Tensor\n",
        "engine/kv_cache/ok.py": "import torchvision_like_name\nfrom ..request import Request\n",
        "engine/runner/prep.py": "from protoserve import v1\n",
        "engine/server/convert.py": "from protoserve.v1 import common_pb2\nimport torch\n",
        "engine/core/loop.py": "from engine.frontend.engine_loop import X\nfrom ..config import C\n",
        "engine/frontend/served.py": "from engine.core.loop import run\nimport rest_bridge.cli\n",
        "engine/server/app.py": "from engine.frontend import served\nfrom protoserve import cli\n",
        "rest_bridge/serve.py": "from protoserve.cli.serve import main\n",
        "protoserve/tracing.py": "from engine.errors import EngineError\n",
        "protoserve/cli/serve.py": "from engine.config import C\nfrom rest_bridge import cli\n",
        "engine/models/llama.py": "import torch\n" + "x = 1\n" * (MAX_LINES - 1),
        "engine/models/big.py": "x = 1\n" * (MAX_LINES + 1),
        "protoserve/v1/huge_pb2.py": "x = 1\n" * (MAX_LINES + 1),
    }
    for rel_path, text in sources.items():
        (tmp_path / rel_path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel_path).write_text(text)
    files = sorted(sources)

    found = import_violations(tmp_path, files, RULES)
    assert [v.split(" (")[0] for v in found] == [
        "engine/core/loop.py:1 imports engine.frontend.engine_loop",
        "engine/core/loop.py:1 imports engine.frontend.engine_loop.X",
        "engine/frontend/served.py:2 imports rest_bridge.cli",
        "engine/kv_cache/pool.py:2 imports torch",
        "engine/kv_cache/pool.py:2 imports torch.Tensor",
        "engine/runner/prep.py:1 imports protoserve.v1",
        "engine/scheduler/policy.py:1 imports torch.nn",
        "engine/server/app.py:2 imports protoserve.cli",
        "protoserve/tracing.py:1 imports engine.errors",
        "protoserve/tracing.py:1 imports engine.errors.EngineError",
        "rest_bridge/app.py:1 imports engine.config",
        "rest_bridge/app.py:1 imports engine.config.EngineConfig",
        "rest_bridge/routes/chat.py:1 imports engine",
        "rest_bridge/serve.py:1 imports protoserve.cli.serve",
        "rest_bridge/serve.py:1 imports protoserve.cli.serve.main",
    ]
    assert oversized(tmp_path, files, MAX_LINES) == [f"engine/models/big.py: {MAX_LINES + 1} lines"]
