"""When the process started and when each cold-start milestone was reached, in seconds from process start."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

# Milestones in the order a cold start normally reaches them.
PYTHON = "python"  # the interpreter is up and runs faasmoe.function
SETTINGS = "settings"  # the FAASMOE_* settings are read
LISTENING = "listening"  # the server accepts connections (/health answers)
IMPORTS = "imports"  # torch and the expert modules are imported
DOWNLOADED = "downloaded"  # an http(s) shard is on local disk (absent for local shards)
VERIFIED = "shard_verified"  # the shard matches the plan's sha256 (or the plan records none)
LOADED = "weights_loaded"  # the experts are mapped (or, from an old shard, copied): /ready answers 200


class Timeline:
    """Milestones of one process's cold start, measured from the kernel's process start time."""

    def __init__(self, forked_at: float | None = None) -> None:
        """``forked_at``: when the zygote forked this process, read from ``fork_clock`` just before the fork;
        exact, where the kernel's start time is rounded to a clock tick (10 ms)."""
        if forked_at is None:
            # The kernel's start time covers interpreter start-up too, which a clock read at import would miss.
            self.clock, self.process_start = _process_clock()
        else:
            self.clock, self.process_start = fork_clock, forked_at
        self._marks: dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, milestone: str) -> float:
        """Records a milestone (now) and returns its offset from process start in seconds."""
        offset = max(0.0, self.clock() - self.process_start)
        with self._lock:
            self._marks.setdefault(milestone, offset)
            return self._marks[milestone]

    def get(self, milestone: str) -> float | None:
        with self._lock:
            return self._marks.get(milestone)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return dict(sorted(self._marks.items(), key=lambda item: item[1]))


# The clock a forked replica's Timeline reads: one clock for the zygote and the replicas it forks.
fork_clock = time.monotonic


def _process_clock() -> tuple[Callable[[], float], float]:
    """A clock and the process's start time on it.

    On Linux: seconds since boot, with the start from /proc/self/stat (exact to a clock tick). psutil's
    create_time() adds the boot time, which the kernel gives in whole seconds, so its offsets could be
    wrong by up to a second.
    """
    stat = Path("/proc/self/stat")
    if hasattr(time, "CLOCK_BOOTTIME") and stat.is_file():
        # Fields after the command name (which may hold spaces) start at field 3; starttime is field 22.
        start_ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])
        return (lambda: time.clock_gettime(time.CLOCK_BOOTTIME)), start_ticks / os.sysconf("SC_CLK_TCK")
    import psutil

    return time.time, psutil.Process().create_time()
