"""A census of live objects, for the soak test (tests/e2e/test_mesh_soak.py), in every Python
process started with this directory on PYTHONPATH and PROTOSERVE_LEAK_PROBE_DIR set: the
engine-serve process and its engine core process alike (the core inherits the environment).

The test asks process PID for a census by creating `PID.want` in that directory; a daemon
thread here collects garbage, counts the live gc-tracked objects by type and writes
`PID.json` ({"module.QualName": count}). The process is otherwise left as it is."""
from __future__ import annotations

import os

_DIR = os.environ.get("PROTOSERVE_LEAK_PROBE_DIR")


def _census() -> dict[str, int]:
    import gc

    gc.collect()
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
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
