"""Waiting-queue policies on their own: FCFS and priority order, preempted requests, removal."""
from __future__ import annotations

import pytest

from engine.core.request import Request
from engine.scheduler.waiting_queue import WaitingQueue, make_waiting_queue
from scheduler_harness import make_request


def _req(request_id: str, priority: int = 0, arrival: float = 0.0) -> Request:
    return make_request(
        request_id, [1, 2, 3], max_tokens=1, priority=priority, arrival_time=arrival
    )


def _drain(queue: WaitingQueue) -> list[str]:
    order = []
    while len(queue):
        assert queue.peek() is queue.peek()
        order.append(queue.pop().request_id)
    return order


def test_fcfs_keeps_arrival_order_and_puts_preempted_in_front() -> None:
    queue = make_waiting_queue("fcfs")
    for i, rid in enumerate("abc"):
        queue.add(_req(rid, priority=-i, arrival=float(i)))
    queue.add_preempted(_req("p", arrival=-1.0))
    assert [r.request_id for r in queue] == ["p", "a", "b", "c"]
    assert _drain(queue) == ["p", "a", "b", "c"]


def test_priority_orders_by_priority_then_arrival() -> None:
    queue = make_waiting_queue("priority")
    specs = {"a": (2, 0.0), "b": (0, 1.0), "c": (2, 2.0), "d": (0, 3.0), "e": (-5, 4.0)}
    for rid, (priority, arrival) in specs.items():
        queue.add(_req(rid, priority, arrival))
    assert len(queue) == 5
    assert [r.request_id for r in queue] == ["e", "b", "d", "a", "c"]
    assert _drain(queue) == ["e", "b", "d", "a", "c"]


def test_priority_preempted_request_keeps_its_place() -> None:
    queue = make_waiting_queue("priority")
    queue.add(_req("later", 1, 5.0))
    queue.add_preempted(_req("old", 1, 1.0))
    queue.add(_req("urgent", 0, 9.0))
    assert _drain(queue) == ["urgent", "old", "later"]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_remove(policy: str) -> None:
    queue = make_waiting_queue(policy)
    reqs = [_req(rid, arrival=float(i)) for i, rid in enumerate("abcd")]
    for r in reqs:
        queue.add(r)
    queue.remove(reqs[0])
    queue.remove(reqs[2])
    assert len(queue) == 2
    assert [r.request_id for r in queue] == ["b", "d"]
    assert _drain(queue) == ["b", "d"]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_removed_id_reused_by_a_new_request(policy: str) -> None:
    queue = make_waiting_queue(policy)
    old = _req("x", priority=0, arrival=0.0)
    queue.add(old)
    queue.add(_req("y", priority=0, arrival=1.0))
    queue.remove(old)
    new = _req("x", priority=0, arrival=2.0)
    queue.add(new)
    assert len(queue) == 2
    assert [r.request_id for r in queue] == ["y", "x"]
    assert queue.pop().request_id == "y"
    assert queue.pop() is new
    assert len(queue) == 0


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        make_waiting_queue("lifo")
