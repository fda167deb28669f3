"""One function replica's life: read its settings, start loading its shard, serve until SIGTERM."""

from __future__ import annotations

import os
import signal
import sys

from pydantic import ValidationError

from faasmoe.function import timeline as milestones
from faasmoe.function.loader import WeightsLoader
from faasmoe.function.settings import FunctionSettings
from faasmoe.function.timeline import Timeline
from faasmoe.logs import setup_logging

EXIT_BAD_SETTINGS = 2


def idle_threads_sleep() -> None:
    """Before torch is imported: OpenMP threads sleep when idle instead of spinning for a while.

    A replica computes in short bursts between requests, on cores it shares with other replicas and
    the control plane: threads spinning after each burst would take those cores from them. An explicit
    OMP_WAIT_POLICY in the environment wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(timeline: Timeline) -> int:
    """The replica's exit code; ``timeline`` was started as early in the process as possible."""
    idle_threads_sleep()
    try:
        settings = FunctionSettings()
    except ValidationError as exc:
        print(f"faasmoe.function: bad settings (FAASMOE_* environment variables):\n{exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    timeline.mark(milestones.SETTINGS)
    setup_logging(settings.log_level)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the previous handler;
    # this handler turns that into a clean exit 0 (also if SIGTERM comes before uvicorn is up).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from faasmoe.function.server import serve

    # Loading starts before the server binds, so torch's import overlaps the server start. (Starting it
    # before importing the server delays listening by ~0.4 s of GIL contention for no gain in readiness.)
    loader = WeightsLoader(settings, timeline)
    loader.start()
    serve(settings, loader, timeline)
    return 0
