"""Samples memory and CPU of every process of the system under test, from the OS, every ~0.5 s.

The system is given as root processes (control-plane servers, the gateway); each sample walks their
process trees with psutil, so function replicas that the gateway starts and stops are picked up as
they come and go. Memory is read the same way for every process (faasmoe.memory.resident_memory):
anonymous and file-backed resident pages separately, and PSS, which divides shared pages (torch's
libraries, a checkpoint mapped by several processes) among the processes sharing them, so the PSS of
all processes adds up to the physical memory the system holds.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

from faasmoe.gateway.embedded import is_zygote
from faasmoe.memory import ResidentMemory, resident_memory

# "runtime" is the embedded gateway's zygote: memory the functions share, not a replica of one.
ROLES = ("control", "gateway", "runtime", "function")


@dataclass(frozen=True)
class ProcessRoot:
    """A process the benchmark started, with the roles of itself and of its descendants."""

    pid: int
    role: str  # "control" (a faasmoe server) or "gateway"
    child_role: str  # the gateway's children are "function" replicas


@dataclass(frozen=True)
class RoleMemory:
    """Memory of all processes of one role at one instant, in bytes."""

    pss: int = 0
    anon: int = 0
    file: int = 0
    rss: int = 0
    processes: int = 0

    def plus(self, memory: ResidentMemory) -> RoleMemory:
        return RoleMemory(
            self.pss + memory.pss,
            self.anon + memory.anon,
            self.file + memory.file,
            self.rss + memory.rss,
            self.processes + 1,
        )


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the run's start
    memory: dict[str, RoleMemory]  # by role
    cpu_s: dict[str, float]  # CPU-seconds (user + system) used by each role since the sampler started

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())

    def total(self, field: str, role: str | None = None) -> int:
        """``field`` ("pss", "anon", "file", "rss", "processes") summed over every role, or of one role."""
        memories = self.memory.values() if role is None else [self.role(role)]
        return sum(getattr(m, field) for m in memories)

    def role(self, name: str) -> RoleMemory:
        return self.memory.get(name, RoleMemory())


@dataclass
class _Tracked:
    process: psutil.Process
    role: str
    cpu_at_start: float  # CPU used before the sampler first saw it inside the window
    cpu_last: float
    first_seen: float


@dataclass
class ProcessTreeSampler:
    """Call ``start()``, later ``stop()``; ``samples`` and ``function_starts`` hold what was seen.

    CPU time is counted per process as its user + system time since the sampler's start (for a
    process started later, since it started), as last read before it exited: at most one sampling
    period of an exiting replica's CPU is missed.
    """

    roots: list[ProcessRoot]
    interval_s: float = 0.5
    t0: float = field(default_factory=time.monotonic)  # shared with the load generator's clock
    samples: list[Sample] = field(default_factory=list)
    function_starts: list[float] = field(default_factory=list)  # when each new function process appeared

    def __post_init__(self) -> None:
        self._tracked: dict[int, _Tracked] = {}
        self._retired: list[_Tracked] = []  # exited processes whose pid was reused: their CPU still counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faasmoe-bench-sampler", daemon=True)

    def start(self) -> None:
        self.sample()  # the baseline: CPU used so far (loading) is not the run's
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self.sample()
            # Fixed-rate ticks: a slow sample does not shift every later one.
            next_at = max(next_at + self.interval_s, time.monotonic())

    def sample(self) -> Sample:
        now = time.monotonic()
        baseline = not self.samples
        memory: dict[str, RoleMemory] = defaultdict(RoleMemory)
        for pid, role in processes(self.roots):
            tracked = self._track(pid, role, now, baseline)
            if tracked is None:
                continue
            try:
                memory[role] = memory[role].plus(resident_memory(pid))
                tracked.cpu_last = _cpu_seconds(tracked.process)
            except (psutil.Error, OSError):  # exited between the walk and the read
                continue
        sample = Sample(now - self.t0, dict(memory), self._cpu_by_role())
        self.samples.append(sample)
        return sample

    def _track(self, pid: int, role: str, now: float, baseline: bool) -> _Tracked | None:
        tracked = self._tracked.get(pid)
        try:
            if tracked is not None:
                if tracked.process.is_running():
                    return tracked
                self._retired.append(tracked)
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            # A process that starts inside the window is charged from zero, its start-up included.
            cpu = _cpu_seconds(process) if baseline else 0.0
        except psutil.Error:
            return None
        self._tracked[pid] = tracked = _Tracked(process, role, cpu, cpu, now - self.t0)
        if role == "function" and not baseline:
            self.function_starts.append(now - self.t0)
        return tracked

    def _cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for tracked in [*self._retired, *self._tracked.values()]:
            totals[tracked.role] += tracked.cpu_last - tracked.cpu_at_start
        return dict(totals)


def processes(roots: list[ProcessRoot]) -> list[tuple[int, str]]:
    """(pid, role) of every live process of the system: the roots and their descendants."""
    found: list[tuple[int, str]] = []
    for root in roots:
        try:
            process = psutil.Process(root.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            found.append((root.pid, root.role))
            found += [(child.pid, _role(child, root)) for child in process.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def _role(child: psutil.Process, root: ProcessRoot) -> str:
    return "runtime" if is_zygote(child, root.pid) else root.child_role


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system
