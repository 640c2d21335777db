"""The engine core process's environment: OpenMP told not to spin after torch's regions (it
would take the core from the kernels' work pool), unless the deployer chose a policy."""
from __future__ import annotations

import pytest

from engine.frontend.core_client import core_process_env


def test_passive_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("PROTOSERVE_WORK_POOL", raising=False)
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    env = core_process_env()
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["SOMETHING_ELSE"] == "kept"


def test_the_deployers_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert core_process_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_left_alone_without_the_work_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("PROTOSERVE_WORK_POOL", "0")
    assert "OMP_WAIT_POLICY" not in core_process_env()
