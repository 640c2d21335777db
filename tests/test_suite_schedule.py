"""The suite's own scheduling table stays true to the tree: every module it groups with
another (to share a server on one xdist worker) exists, so a rename cannot silently split a
group and start its server twice."""
from __future__ import annotations

from engine_process import REPO_ROOT
from suite_schedule import SHARED_SERVER_GROUPS, module_of, xdist_group_of


def test_every_grouped_module_exists_and_asks_for_a_shared_server() -> None:
    for group, modules in SHARED_SERVER_GROUPS.items():
        assert len(modules) > 1, f"{group}: a group of one shares nothing"
        for module in modules:
            path = REPO_ROOT / module
            assert path.is_file(), f"{group}: {module} does not exist"
            source = path.read_text()
            assert "shared_server" in source or "served_model" in source, (
                f"{group}: {module} does not use a shared server")


def test_a_module_outside_the_table_is_its_own_group() -> None:
    nodeid = "tests/test_suite_schedule.py::test_a_module_outside_the_table_is_its_own_group"
    assert xdist_group_of(module_of(nodeid)) == "tests/test_suite_schedule.py"
    grouped = SHARED_SERVER_GROUPS["shared-server:tiny-llama"][0]
    assert xdist_group_of(grouped) == "shared-server:tiny-llama"
