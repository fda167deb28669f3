"""`python -m faasmoe.function`: one expert-group function replica (of-watchdog's fprocess)."""

from __future__ import annotations

# The timeline comes first: every later step of the cold start is measured against process start.
from faasmoe.function.timeline import PYTHON, Timeline

TIMELINE = Timeline()
TIMELINE.mark(PYTHON)

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from faasmoe.function.loader import WeightsLoader  # noqa: E402
from faasmoe.function.settings import FunctionSettings  # noqa: E402

EXIT_BAD_SETTINGS = 2


def main() -> int:
    try:
        settings = FunctionSettings()
    except ValidationError as exc:
        print(f"faasmoe.function: bad settings (FAASMOE_* environment variables):\n{exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the previous handler;
    # this handler turns that into a clean exit 0 (also if SIGTERM comes before uvicorn is up).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from faasmoe.function.server import serve

    # Loading starts before the server binds, so torch's import overlaps the server start. (Starting it
    # before importing the server delays listening by ~0.4 s of GIL contention for no gain in readiness.)
    loader = WeightsLoader(settings, TIMELINE)
    loader.start()
    serve(settings, loader, TIMELINE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
