"""Reading the repository's imports from source with `ast` (nothing is imported, so a broken
module cannot hide a dependency and torch is never loaded): the helpers of test_repo_shape.py
and test_import_cycles.py."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest


def python_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored .py files, as posix paths relative to `root`."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git")
    # A tracked file deleted in the working tree is still listed by --cached.
    return sorted({p for p in listed.split("\0") if p and (root / p).is_file()})


def module_name(rel_path: str) -> str:
    """engine/kv_cache/pool.py -> engine.kv_cache.pool; engine/__init__.py -> engine."""
    parts = rel_path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, rel_path: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement in `source`.

    `from a import b` yields "a.b" as well as "a", because b may be a submodule
    (`from protoserve import v1`); a false "a.b" for an attribute can only make a name longer,
    never hide a forbidden prefix. Relative imports are resolved against the file's package.
    """
    tree = ast.parse(source, filename=rel_path)
    module = module_name(rel_path)
    is_package = rel_path.endswith("__init__.py")
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base:
                found.append((node.lineno, base))
            found.extend(
                (node.lineno, f"{base}.{alias.name}" if base else alias.name)
                for alias in node.names
                if alias.name != "*"
            )
    return found
