"""A census of live objects, for the soak test (tests/e2e/test_mesh_soak.py), in every Python
process started with this directory on PYTHONPATH and PROTOSERVE_LEAK_PROBE_DIR set: the
engine-serve process and its engine core process alike (the core inherits the environment).

The test asks process PID for a census by creating `PID.want` in that directory; a daemon
thread here collects garbage, counts the live gc-tracked objects by type and writes
`PID.json` ({"module.QualName": count}). The process is otherwise left as it is.

Cancelled asyncio timers are left out of the count, with the context each one holds: the event
loop keeps a cancelled timer in its heap until its time comes or until cancelled ones are half
the heap (then it drops them all), so their number swings between 0 and ~100 with when the
census happens to run. Every `asyncio.timeout` a stream enters leaves one behind; none is
reachable from a request."""
from __future__ import annotations

import os

_DIR = os.environ.get("PROTOSERVE_LEAK_PROBE_DIR")


def _census() -> dict[str, int]:
    import gc

    import asyncio

    gc.collect()
    objects = gc.get_objects()
    # `type(obj) is`, not isinstance: isinstance looks up `__class__` on every object, and
    # some objects answer by creating weak references, which the census would then count.
    cancelled = [obj for obj in objects
                 if type(obj) is asyncio.TimerHandle and obj.cancelled()]
    left_out = {id(obj) for obj in cancelled}
    left_out.update(id(getattr(obj, "_context", None)) for obj in cancelled)
    counts: dict[str, int] = {}
    for obj in objects:
        if id(obj) in left_out:
            continue
        kind = type(obj)
        name = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', '?')}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def _serve(directory: str) -> None:
    import json
    import time

    pid = os.getpid()
    want = os.path.join(directory, f"{pid}.want")
    out = os.path.join(directory, f"{pid}.json")
    while True:
        time.sleep(0.05)
        if os.path.exists(want):
            os.remove(want)
            counts = _census()
            with open(out + ".tmp", "w") as f:
                json.dump(counts, f)
            os.replace(out + ".tmp", out)


if _DIR:
    import threading

    threading.Thread(target=_serve, args=(_DIR,), name="leak-probe", daemon=True).start()
