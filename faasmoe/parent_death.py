"""Linux's parent-death signal: a child process that must not outlive the process that started it."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Looked up once, in the parent: a forked child of a threaded process must not dlopen (another
# thread may have held the loader's lock at the fork).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In the child: get ``signum`` when the parent (the thread that forked it) dies. Linux only."""
    assert _prctl is not None, "the parent-death signal is Linux's"
    _prctl(_PR_SET_PDEATHSIG, signum)
