"""CPU seconds per process of a benchmark: this process (the client, or the offline engine) and
an `engine-serve` process with its children (the engine core process, the REST bridge)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(engine_pid: int, marker: bytes) -> int | None:
    """The child of the engine process whose command line names `marker`: `rest_bridge` (the
    bridge of `--role all`) or `engine.core.process_main` (the engine core process)."""
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == engine_pid and marker in argv:
            return int(entry.name)
    return None


class CpuMeter:
    """CPU seconds of this process and, when serving, the engine (gRPC side), its core
    process (the step loop) and the bridge."""

    def __init__(self, engine_pid: int | None = None) -> None:
        candidates = {"engine": engine_pid, "core": None, "bridge": None}
        if engine_pid is not None:
            candidates["core"] = child_pid(engine_pid, b"engine.core.process_main")
            candidates["bridge"] = child_pid(engine_pid, b"rest_bridge")
        self.pids = {name: pid for name, pid in candidates.items() if pid is not None}

    def sample(self) -> dict[str, float]:
        now = {"client": time.process_time()}
        for name, pid in self.pids.items():
            try:
                now[name] = process_cpu_s(pid)
            except OSError:
                now[name] = math.nan
        return now

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 2) for name in before}
