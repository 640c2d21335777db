"""The CUDA KV budget arithmetic behind --gpu-memory-utilization (pure function; the device
query itself only runs on GPU machines)."""
from __future__ import annotations

import pytest

from engine.config import CacheConfig
from engine.runner.kv_memory import cuda_kv_budget

GIB = 1024**3


def test_budget_is_the_allowed_share_minus_what_is_in_use_and_the_reserve() -> None:
    # 80 GiB device, 20 GiB already used by weights and the CUDA context, 90% allowed.
    assert cuda_kv_budget(80 * GIB, 60 * GIB, 0.9) == int(72 * GIB) - 20 * GIB - GIB


def test_budget_never_goes_negative() -> None:
    assert cuda_kv_budget(16 * GIB, 1 * GIB, 0.5) == 0


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_utilization_outside_the_unit_interval_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=value)
