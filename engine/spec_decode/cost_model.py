"""The step cost model behind cost-aware speculation: how much a verified draft token costs
next to the step it rides on, measured on this machine as the engine runs.

A decode step of T rows takes about t(T) = a + b T: a is what every step pays whatever its
size (streaming the weights, launching the layers, host work), b what each row adds (its
share of the GEMMs once they stop being weight-bound, its attention, its logits). Only the
ratio r = b / a matters for the decision:

    plain step of N requests:   N tokens in a + b N
    one more draft row:         costs b, yields P(accepted) tokens
    worth it iff  P > b N / (a + b N) = r N / (1 + r N)          (engine.spec_decode.proposals)

so at batch 1 almost any draft pays (r ~ 0.03: a 5-row step costs ~1.1x a 1-row one), while a
batch of 32 needs drafts accepted about half the time.

The fit: per distinct row count, an exponential average of the runner's time for steps whose
rows are all decode rows (plain decodes and verifications; a prefill chunk's time is not
linear in its tokens), then weighted least squares over those averages. Until two row counts
far enough apart have been seen, or when the fit is implausible (a busy machine can make a
bigger step look faster), r stays at the prior.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.core.batch import ScheduledRequest

# Relative per-row cost before any measurement: a 100M-parameter bf16 Llama shape with AMX
# GEMMs (one thread, 2026-12-07): 1 row 0.37 ms, 5 rows 0.41 ms, 40 rows 0.75 ms per layer.
PRIOR_ROW_COST = 0.03
_MIN_ROW_COST, _MAX_ROW_COST = 0.001, 1.0
_DECAY = 0.9  # weight of the previous average for a row count at each new step
_MAX_ROW_COUNTS = 64  # row counts kept; the least recently seen goes first
_MIN_SPREAD = 2  # row counts this far apart make a slope


class StepCostModel:
    def __init__(self, prior_row_cost: float = PRIOR_ROW_COST) -> None:
        self.prior_row_cost = prior_row_cost
        # row count -> (average seconds, weight): weight grows to 1 / (1 - _DECAY).
        self._times: dict[int, tuple[float, float]] = {}
        self._row_cost: float | None = None

    def observe(self, requests: Sequence[ScheduledRequest], seconds: float) -> None:
        """One step's runner time; kept only for steps of decode rows alone."""
        if not requests or not all(
            request.num_tokens == 1 + len(request.draft_token_ids) for request in requests
        ):
            return
        rows = sum(request.num_tokens for request in requests)
        average, weight = self._times.pop(rows, (seconds, 0.0))
        self._times[rows] = (_DECAY * average + (1 - _DECAY) * seconds if weight else seconds,
                             _DECAY * weight + 1.0)
        if len(self._times) > _MAX_ROW_COUNTS:
            del self._times[next(iter(self._times))]
        self._row_cost = None

    @property
    def row_cost(self) -> float:
        """r = b / a, the cost of one more row relative to a step's fixed cost."""
        if self._row_cost is None:
            self._row_cost = self._fit()
        return self._row_cost

    def draft_threshold(self, num_requests: int) -> float:
        """The acceptance probability a draft row needs to pay for itself in a step of
        `num_requests` requests (see the top)."""
        cost = self.row_cost * max(num_requests, 1)
        return cost / (1 + cost)

    @property
    def prior_threshold(self) -> float:
        """The batch-1 threshold of the prior: fixed, for decisions that must not depend on
        measurements."""
        return self.prior_row_cost / (1 + self.prior_row_cost)

    def _fit(self) -> float:
        points = [(rows, average, weight) for rows, (average, weight) in self._times.items()]
        if len(points) < 2 or max(p[0] for p in points) - min(p[0] for p in points) < _MIN_SPREAD:
            return self.prior_row_cost
        total = sum(w for _, _, w in points)
        mean_x = sum(x * w for x, _, w in points) / total
        mean_y = sum(y * w for _, y, w in points) / total
        var_x = sum(w * (x - mean_x) ** 2 for x, _, w in points)
        slope = sum(w * (x - mean_x) * (y - mean_y) for x, y, w in points) / var_x
        intercept = mean_y - slope * mean_x
        if intercept <= 0 or slope < 0:
            return self.prior_row_cost
        return min(max(slope / intercept, _MIN_ROW_COST), _MAX_ROW_COST)
