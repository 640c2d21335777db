"""Speculation decisions in these tests must not depend on how fast this machine is.

How many drafts a request gets follows the step cost model's fit of the runner's measured
step times (engine/spec_decode/cost_model.py), so on a loaded machine the same test could
propose, and accept, a different number of drafts. Outputs never depend on it (greedy equal to
non-speculative decoding whatever is proposed), but the tests that count accepted drafts do:
every engine built here keeps the model at its prior. The fit itself is tested with recorded
timings in test_cost_aware_back_off.py, which builds its own StepCostModel.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from engine.core.batch import ScheduledRequest
from engine.spec_decode import proposals
from engine.spec_decode.cost_model import StepCostModel


class PriorOnlyCostModel(StepCostModel):
    def observe(self, requests: Sequence[ScheduledRequest], seconds: float) -> None:
        """Measured step times are not recorded: the row cost stays at the prior."""


@pytest.fixture(scope="session", autouse=True)
def cost_model_at_its_prior() -> Iterator[None]:
    # Session scope: module-scoped engines (built before any function fixture) included.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(proposals, "StepCostModel", PriorOnlyCostModel)
        yield
