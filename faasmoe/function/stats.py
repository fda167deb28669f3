"""The /stats document: what the function holds, how its cold start went, memory and invocation counts."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from faasmoe.function import timeline as milestones
from faasmoe.function.loader import WeightsLoader
from faasmoe.function.timeline import Timeline
from faasmoe.memory import resident_memory


@dataclass
class Counters:
    """Invocation outcomes; updated on the event loop thread only, so no lock is needed."""

    invocations: int = 0  # answered 200
    bad_requests: int = 0  # answered 400, or 413 for an over-size body
    errors: int = 0  # answered 500 after loading (unexpected compute failures)
    not_ready: int = 0  # answered 503 or 500 because the weights were not (or could not be) loaded


def startup_phases(marks: dict[str, float]) -> dict[str, float]:
    """Durations of the cold-start phases, from the milestone offsets (each phase ends at its milestone)."""
    phases: dict[str, float] = {}
    if milestones.PYTHON in marks:
        phases["interpreter"] = marks[milestones.PYTHON]
    if milestones.LISTENING in marks and milestones.PYTHON in marks:
        phases["server_start"] = marks[milestones.LISTENING] - marks[milestones.PYTHON]
    if milestones.IMPORTS in marks and milestones.PYTHON in marks:
        # Imports run in the loader thread, concurrently with the server start.
        phases["imports"] = marks[milestones.IMPORTS] - marks[milestones.PYTHON]
    if milestones.LOADED in marks and milestones.IMPORTS in marks:
        phases["weights"] = marks[milestones.LOADED] - marks[milestones.IMPORTS]
    if milestones.VERIFIED in marks and milestones.IMPORTS in marks:
        # Within "weights": the digest check (after the download, if any); the rest maps the tensors.
        phases["verify"] = marks[milestones.VERIFIED] - marks.get(milestones.DOWNLOADED, marks[milestones.IMPORTS])
    if milestones.DOWNLOADED in marks and milestones.IMPORTS in marks:
        phases["download"] = marks[milestones.DOWNLOADED] - marks[milestones.IMPORTS]
    if milestones.LOADED in marks:
        phases["total"] = marks[milestones.LOADED]
    return phases


def function_stats(function: str, loader: WeightsLoader, timeline: Timeline, counters: Counters) -> dict[str, Any]:
    marks = timeline.as_dict()
    invoker = loader.invoker
    held = invoker.held() if invoker else []
    return {
        "function": function,
        "state": loader.state.value,
        "error": loader.error,
        "experts": {"count": len(held), "held": [list(pair) for pair in held]},
        "weights_bytes": invoker.nbytes() if invoker else 0,
        "shard_digest": loader.digest.value if loader.digest else None,  # hashed, reused or unverified
        "startup_s": marks,  # offsets from process start
        "startup_phases_s": startup_phases(marks),
        "memory": resident_memory().as_dict(),  # bytes: rss, anon (copied tensors), file (mapped), pss
        "cpu_s": time.process_time(),  # CPU this process has used so far, all its threads (a fork starts at 0)
        **asdict(counters),
        "threads": {
            "torch_intra_op": invoker.threads() if invoker else None,
            "process": threading.active_count(),
            "os": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None,
        },
        "http_parser": http_parser(),
        "pid": os.getpid(),
    }


def http_parser() -> str:
    """The HTTP/1.1 parser uvicorn picked ("auto": httptools when installed; ~0.1-0.4 ms less per call)."""
    return "httptools" if importlib.util.find_spec("httptools") else "h11"
