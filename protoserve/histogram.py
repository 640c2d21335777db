"""A fixed-bucket histogram as plain data: no locks, no Prometheus, so the engine core can count
tokens per step with it and `serving_metrics` can render it.

One writer at a time. A reader on another thread copies it with `snapshot()`; a copy taken
while the writer is inside `observe` may hold a count whose value is not yet in `total`,
which a scrape tolerates (the next one is exact).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence


def one_two_five(limit: float) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit`: the reference server's token-count buckets."""
    bounds: list[int] = []
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude > limit:
                return tuple(bounds)
            bounds.append(step * magnitude)
        magnitude *= 10


class Histogram:
    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (one bisect for a run of equal values)."""
        self.counts[bisect.bisect_left(self.buckets, value)] += count
        self.total += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> Histogram:
        copy = Histogram(self.buckets)
        copy.counts, copy.total = list(self.counts), self.total
        return copy
