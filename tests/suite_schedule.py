"""Which test modules go to one pytest-xdist worker together, and in what order: longest first.

`make test` runs two workers with `--dist loadfile`, which hands out work units in collection
order; the scheduler below makes a unit a module, as loadfile does (its servers start once),
or, for the modules in SHARED_SERVER_GROUPS, all of the modules that share a server:
`shared_server` (tests/conftest.py) keeps one server per worker, so modules asking for the
same server start it once only when they run on the same worker. (xdist's own
`--dist loadgroup` renames node ids, which pytest 9 no longer allows.)

Left to itself xdist orders units by their number of tests, so a module of one minute-long
test (the schemathesis run, the tensor-parallel cases) came last and one worker ran it alone
while the other had finished. The collection is sorted so that the longest units come first
(the "longest processing time" rule), and the scheduler keeps that order: both workers end
within about one short module of each other.

Durations come from module_durations.json, written by a whole-suite run with
`--module-durations-out tests/module_durations.json` (seconds per module, summed over setup,
call and teardown; only the ratios matter, so a busy machine's run serves). A module the file
does not know yet goes by its tier: an end-to-end, slow or fuzz module near the front, any
other at the back.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS_FILE = Path(__file__).resolve().with_name("module_durations.json")
# Unknown modules: a server start alone costs this much on a busy 2-core machine, while a
# unit module is typically a second or two.
UNKNOWN_SERVER_MODULE_S = 20.0
UNKNOWN_UNIT_MODULE_S = 1.0
_LONG_TIERS = ("e2e", "slow", "fuzz")

# Modules (paths relative to the repository) that ask `shared_server` for the same server as
# another module: the tiny Llama with engine-serve's defaults (tests/e2e/conftest.py's
# served_model) or with `--max-model-len 256`, and generation_params' flags. A module missing
# here still passes; it may only start a server its neighbour already has.
SHARED_SERVER_GROUPS: dict[str, tuple[str, ...]] = {
    "shared-server:tiny-llama": (
        "tests/e2e/test_anthropic_messages_served.py",
        "tests/e2e/test_lora_served.py",
        "tests/e2e/test_offline_served_parity.py",
        "tests/e2e/test_openai_sdk.py",
        "tests/e2e/test_render_served.py",
        "tests/e2e/test_responses_served.py",
        "tests/e2e/test_slow_template_isolation.py",
        "tests/e2e/test_tool_choice_served.py",
        "tests/engine/server/test_grpc_fuzz.py",
        "tests/engine/server/test_grpc_server.py",
        "tests/engine/server/test_request_bounds.py",
    ),
    "shared-server:generation-params": (
        "tests/e2e/test_generation_params.py",
        "tests/e2e/test_generation_params_parity.py",
        "tests/e2e/test_openai_stream_shape.py",
    ),
}
_GROUP_OF_MODULE = {module: group for group, modules in SHARED_SERVER_GROUPS.items()
                    for module in modules}


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def read_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # missing or damaged: the tier fallback
        return {}


def xdist_group_of(module: str) -> str:
    return _GROUP_OF_MODULE.get(module, module)


def make_scheduler(config: pytest.Config, log: object) -> object | None:
    """pytest-xdist's scheduler for `--dist loadfile`: one work unit per module or per
    shared-server group, handed out in collection order; None (xdist's own) otherwise."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # only under xdist

    class SharedServerScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(module_of(nodeid))

    config.option.loadscopereorder = False  # keep longest_groups_first's order
    return SharedServerScheduling(config, log)


def longest_groups_first(items: list[pytest.Item], durations: dict[str, float]) -> None:
    """Reorders `items` in place: whole groups, longest first, and within a group whole
    modules, longest first; tests keep their order within a module (module-scoped fixtures
    and tests that build on each other rely on it), and equal weights keep their collection
    order."""
    by_module: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        by_module[module_of(item.nodeid)].append(item)

    def weight(module: str) -> float:
        if module in durations:
            return durations[module]
        long_tier = any(item.get_closest_marker(tier) is not None
                        for item in by_module[module] for tier in _LONG_TIERS)
        return UNKNOWN_SERVER_MODULE_S if long_tier else UNKNOWN_UNIT_MODULE_S

    groups: dict[str, list[str]] = defaultdict(list)
    for module in sorted(by_module, key=weight, reverse=True):  # sorted() is stable
        groups[xdist_group_of(module)].append(module)
    order = sorted(groups.values(), key=lambda modules: sum(map(weight, modules)),
                   reverse=True)
    items[:] = [item for modules in order for module in modules for item in by_module[module]]


class DurationRecorder:
    """Sums each module's test phases as reports arrive (under xdist, in the controller) and
    writes them as JSON at the end of the session."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[module_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
            return
        ordered = dict(sorted(((m, round(s, 1)) for m, s in self.seconds.items()),
                              key=lambda kv: -kv[1]))
        self.out.write_text(json.dumps(ordered, indent=1) + "\n")
