"""Just-in-time builds of the csrc/ extensions, cached across processes.

Only `engine.ops` uses this module. A build lives in

    $PROTOSERVE_CACHE_DIR (default ~/.cache/protoserve) / extensions / <name>-<key>/

where <key> hashes everything that changes the binary: the sources and headers, the torch,
CUDA and Python versions, the compiler flags, the compiler and, for `-march=native`, the
host CPU's feature flags. A directory with a `complete` marker is imported directly (no
compiler, no ninja), so later processes start instantly. Concurrent first builds serialise on
an `fcntl.flock` of `build.lock` in that directory: one process compiles, the others wait
and then import its result.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "PROTOSERVE_CACHE_DIR"
_COMPLETE_MARKER = "complete"


class NativeBuildError(RuntimeError):
    """The extension cannot be built or loaded here; the message is one line for the log."""


@dataclass(frozen=True)
class ExtensionSpec:
    name: str  # also the pybind11 module name (TORCH_EXTENSION_NAME)
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()  # hashed into the key, not compiled on their own
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    # Anything else the binary depends on (e.g. the GPU's compute capability).
    key_parts: tuple[str, ...] = field(default=())

    @property
    def uses_cuda(self) -> bool:
        return any(path.suffix == ".cu" for path in self.sources)


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "protoserve"


def compiler() -> str:
    """The C++ compiler torch's extension builder will use."""
    return os.environ.get("CXX", "c++")


def build_key(spec: ExtensionSpec) -> str:
    digest = hashlib.sha256()
    for path in sorted((*spec.sources, *spec.headers)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    parts = [
        spec.name,
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        platform.machine(),
        *spec.cflags,
        *spec.cuda_cflags,
        *spec.ldflags,
        *spec.key_parts,
        _compiler_identity(),
    ]
    if "-march=native" in spec.cflags:
        parts.append(_cpu_flags())
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def load_extension(spec: ExtensionSpec) -> ModuleType:
    """Import the cached build of `spec`, building it first when needed."""
    if shutil.which(compiler()) is None:
        raise NativeBuildError(f"no C++ compiler ({compiler()!r} is not on PATH)")
    build_dir = cache_dir() / "extensions" / f"{spec.name}-{build_key(spec)}"
    library = build_dir / f"{spec.name}.so"
    if (build_dir / _COMPLETE_MARKER).is_file():
        return _import_library(spec.name, library)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create {build_dir}: {exc}") from None
    with open(build_dir / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Say why start-up pauses: another process (the other half of engine-serve, a
            # test, bootstrap) is compiling the same build.
            logger.info("waiting for another process compiling %s into %s", spec.name, build_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished the build while this one waited.
            if (build_dir / _COMPLETE_MARKER).is_file():
                return _import_library(spec.name, library)
            module = _compile(spec, build_dir)
            (build_dir / _COMPLETE_MARKER).write_text(f"{spec.name}\n")
            return module
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile(spec: ExtensionSpec, build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise NativeBuildError("ninja is not installed (pip install ninja)")
    # torch's own lock file; a crashed build may have left one behind, and under our flock
    # nobody else is building in this directory.
    (build_dir / "lock").unlink(missing_ok=True)
    logger.info("compiling native kernels %s (first start only, about a minute; later "
                "processes reuse %s)", spec.name, build_dir)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=spec.name,
            sources=[str(path) for path in spec.sources],
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            build_directory=str(build_dir),
            with_cuda=spec.uses_cuda,
            verbose=False,
        )
    except Exception as exc:  # compiler errors, missing headers, linker or import failures
        raise NativeBuildError(_first_line(exc)) from exc
    logger.info("compiled %s in %.0f s", spec.name, time.perf_counter() - start)
    return module


def _import_library(name: str, library: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(library))
    spec = importlib.util.spec_from_file_location(name, str(library), loader=loader)
    if spec is None:
        raise NativeBuildError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    try:
        loader.exec_module(module)
    except ImportError as exc:
        raise NativeBuildError(f"cannot import {library}: {_first_line(exc)}") from exc
    return module


def _compiler_identity() -> str:
    try:
        result = subprocess.run(
            [compiler(), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.splitlines()[0] if result.stdout else "unknown"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
