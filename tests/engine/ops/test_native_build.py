"""The extension cache of engine.native_build: keys, reuse across loads, and one build when
several loaders race (the compiler itself is replaced by a stub; the real build is covered by
the kernel tests)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from engine import native_build
from engine.native_build import ExtensionSpec, NativeBuildError


def make_spec(tmp_path: Path, source: str = "int f() { return 1; }\n") -> ExtensionSpec:
    source_path = tmp_path / "src" / "op.cpp"
    source_path.parent.mkdir(exist_ok=True)
    source_path.write_text(source)
    return ExtensionSpec(name="fake_ops", sources=(source_path,), cflags=("-O3",))


@pytest.fixture
def stub_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Builds take 0.2 s and produce a module object; returns the list of build dirs used."""
    monkeypatch.setenv(native_build.CACHE_DIR_ENV, str(tmp_path / "cache"))
    builds: list[Path] = []

    def compile_stub(spec: ExtensionSpec, build_dir: Path) -> ModuleType:
        builds.append(build_dir)
        time.sleep(0.2)
        (build_dir / f"{spec.name}.so").write_bytes(b"")
        return ModuleType(spec.name)

    monkeypatch.setattr(native_build, "_compile", compile_stub)
    monkeypatch.setattr(native_build, "_import_library", lambda name, path: ModuleType(name))
    return builds


def test_concurrent_first_loads_build_once(stub_compiler: list[Path], tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    loaded: list[ModuleType] = []
    threads = [
        threading.Thread(target=lambda: loaded.append(native_build.load_extension(spec)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 4 and len(stub_compiler) == 1
    assert (stub_compiler[0] / "complete").is_file()
    # A later load (another process, in practice) imports the finished build directly.
    native_build.load_extension(spec)
    assert len(stub_compiler) == 1


def test_key_follows_sources_and_flags(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    key = native_build.build_key(spec)
    assert native_build.build_key(spec) == key
    assert native_build.build_key(make_spec(tmp_path, "int f() { return 2; }\n")) != key
    make_spec(tmp_path)  # restore the original source
    assert native_build.build_key(spec) == key
    flagged = ExtensionSpec(name=spec.name, sources=spec.sources, cflags=("-O2",))
    assert native_build.build_key(flagged) != key


def test_missing_compiler_is_a_build_error(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-protoserve")
    with pytest.raises(NativeBuildError, match="no C\\+\\+ compiler"):
        native_build.load_extension(make_spec(tmp_path))
