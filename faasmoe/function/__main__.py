"""`python -m faasmoe.function`: one expert-group function replica (of-watchdog's fprocess)."""

from __future__ import annotations

# The timeline comes first: every later step of the cold start is measured against process start.
from faasmoe.function.timeline import PYTHON, Timeline

TIMELINE = Timeline()
TIMELINE.mark(PYTHON)

import sys  # noqa: E402

from faasmoe.function.main import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(TIMELINE))
