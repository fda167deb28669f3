"""The one logging setup of faasmoe's servers (control plane, embedded gateway, function replica)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log at ``level`` (debug, info, ...) to stderr; httpx only from WARNING up.

    httpx logs every request at INFO: one line per expert invocation, readiness probe and forwarded
    request is noise.
    """
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
