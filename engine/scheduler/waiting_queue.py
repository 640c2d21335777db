"""Waiting-queue policies behind one interface: FCFS and priority (lower value runs first).

Preempted requests go back to the waiting queue and keep their original arrival time, so under
FCFS they resume before anything that arrived after them.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from engine.core.request import Request


class WaitingQueue(Protocol):
    def add(self, request: Request) -> None: ...
    def add_preempted(self, request: Request) -> None: ...
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue:
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        # Preempted requests are older than everything still waiting: put them in front.
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityQueue:
    """Ordered by (priority, arrival time); removal is lazy (entries are skipped on pop).

    `_live` maps each queued request id to the sequence number of its one live heap entry.
    Keying liveness by entry rather than by id matters: an aborted request leaves a dead entry
    behind, and a new request reusing its id must not bring that entry back to life.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._live: dict[str, int] = {}
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        seq = next(self._counter)
        heapq.heappush(self._heap, (request.priority, request.arrival_time, seq, request))
        self._live[request.request_id] = seq

    add_preempted = add

    def _is_live(self, entry: tuple[int, float, int, Request]) -> bool:
        return self._live.get(entry[3].request_id) == entry[2]

    def _drop_removed(self) -> None:
        while self._heap and not self._is_live(self._heap[0]):
            heapq.heappop(self._heap)

    def peek(self) -> Request:
        self._drop_removed()
        return self._heap[0][3]

    def pop(self) -> Request:
        self._drop_removed()
        request = heapq.heappop(self._heap)[3]
        del self._live[request.request_id]
        return request

    def remove(self, request: Request) -> None:
        self._live.pop(request.request_id, None)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap) if self._is_live(entry))


def make_waiting_queue(policy: str) -> WaitingQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"unknown scheduling policy {policy!r}")
