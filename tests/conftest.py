"""Fixtures shared by the whole suite, and its tiers.

Helper modules in tests/ (such as model_factory.py) are imported by bare name,
`from model_factory import build_tiny_model`: tests/ has no __init__.py files, and this
conftest puts its own directory on sys.path before any test module is collected (pytest's
default "prepend" import mode would add it too; doing it here does not depend on that mode).

Tiers (markers registered in pyproject.toml): `e2e` marks every test that starts real servers
(engine-serve, an engine core process, the bridge). It is added here, at collection, to the
tests under E2E_DIRS and to every test that uses a fixture marked `@starts_servers` (directly
or through other fixtures); a test elsewhere that starts one itself carries `@pytest.mark.e2e`.
start_engine refuses to start a server for a test without the marker, so `make test-fast`
(`-m "not e2e and not slow and not fuzz"`) never waits for one.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import engine_process  # noqa: E402 - needs the sys.path entry above
import suite_schedule  # noqa: E402
from engine_process import EngineProcess, starts_servers  # noqa: E402

# Every test below these directories (relative to tests/) starts real servers.
E2E_DIRS = (("e2e",), ("surfaces",), ("engine", "cli"))


def _starts_servers(item: pytest.Item) -> bool:
    path = Path(item.path).resolve()
    parts = path.relative_to(_TESTS_DIR).parts if path.is_relative_to(_TESTS_DIR) else ()
    if any(parts[: len(prefix)] == prefix for prefix in E2E_DIRS):
        return True
    # Every fixture the test uses, directly or not, as it resolves for this test (the last
    # definition of a name overrides the others).
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(getattr(fixturedefs[-1].func, "starts_servers", False)
               for fixturedefs in definitions.values() if fixturedefs)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--module-durations-out", type=Path, default=None,
                     help="write each module's seconds (setup + call + teardown) to this JSON "
                     "file, the order tests/suite_schedule.py hands modules out in "
                     "(default: not written)")


def pytest_configure(config: pytest.Config) -> None:
    out = config.getoption("--module-durations-out")
    if out is not None:
        config.pluginmanager.register(suite_schedule.DurationRecorder(out), "module-durations")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is None and _starts_servers(item):
            item.add_marker(pytest.mark.e2e)
    # Longest first, so that neither xdist worker is left alone with a long module at the end.
    suite_schedule.longest_groups_first(items, suite_schedule.read_durations())


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under `--dist loadfile`, modules that share a server run on one worker."""
    return suite_schedule.make_scheduler(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    engine_process.running_e2e_test = item.get_closest_marker("e2e") is not None


@pytest.fixture(scope="session")
def native_cpu_ops() -> None:
    """The native CPU ops, built (or found built); the requesting tests skip where no C++
    compiler or ninja can build them, and fail if a build that could run did not."""
    import shutil

    from torch.utils import cpp_extension

    from engine import native_build, ops

    if shutil.which(native_build.compiler()) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the native CPU ops cannot be built here")
    assert ops.native_available("cpu"), "the native CPU ops failed to build (see the log)"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the factory tokenizer and the ChatML template (read-only)."""
    # Imported here: torch and transformers are heavy, and many test modules need neither.
    from model_factory import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with an 8192-token context, so a stream can outlast a test's checks."""
    from mesh_helpers import build_long_context_model

    return build_long_context_model(tmp_path_factory.mktemp("long-llama"))


@pytest.fixture(scope="session")
@starts_servers
def shared_server(tiny_llama_dir: Path) -> Iterator[Callable[..., EngineProcess]]:
    """`shared_server(*flags, role=..., model_dir=...)`: an engine-serve (start_engine's
    defaults, `tiny_llama_dir` unless told) that every test module asking for the same model,
    role and flags shares, started on first use and stopped at the end of the session.

    Only for tests that leave the server as they found it: a test that drains, kills or
    reconfigures its server, or measures the process, starts its own."""
    running: dict[tuple[str, str, tuple[str, ...]], EngineProcess] = {}

    def get(*flags: str, role: str = "engine", model_dir: Path | None = None) -> EngineProcess:
        key = (str(model_dir or tiny_llama_dir), role, flags)
        server = running.get(key)
        if server is None:
            server = running[key] = engine_process.start_engine(Path(key[0]), *flags,
                                                                role=role)
        assert server.process.poll() is None, (
            f"the shared engine-serve {key} exited with {server.process.returncode}")
        return server

    try:
        yield get
    finally:
        with ThreadPoolExecutor(max(len(running), 1)) as pool:  # side by side: each waits
            list(pool.map(EngineProcess.stop, running.values()))
