"""SHA-256 digests of a plan's weight files: `faasmoe export` records them, whoever loads a file checks it.

A file is hashed once per identity, not on every load: the digests of files already hashed are kept by
(device, inode, size, mtime, ctime). Any write to a file changes its ctime, which no user can set, so a
modified file is hashed again. A file changed less than RACY_WINDOW_NS before it was hashed is not kept:
a second change within the same timestamp tick would leave its identity as it was (git's "racy" entries).
Replicas forked from the zygote report what they hashed to it (``report_to``, ``learn``), so the next
replica of the same shard inherits the digest instead of reading 346 MB again.

Torch-free: the function server imports this (through its settings) before torch is imported.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import threading
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Annotated, BinaryIO

from pydantic import StringConstraints

from faasmoe.errors import ShardError

# Lowercase hex, as hashlib writes it; upper case is accepted from a hand-written value and lowered.
Sha256 = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")]
# Enough of a digest to tell two apart in an error message.
SHOWN_HEX = 12
# Far above a filesystem timestamp's granularity (a clock tick, at most 10 ms on Linux).
RACY_WINDOW_NS = 1_000_000_000


class DigestCheck(enum.Enum):
    """How a load checked its file against the plan's digest."""

    HASHED = "hashed"  # read and hashed now
    REUSED = "reused"  # this very file, unchanged, was hashed before (in this process or before the fork)
    UNVERIFIED = "unverified"  # the plan records no digest (version 1)


@dataclass(frozen=True)
class FileIdentity:
    """What changes whenever a file's content may have: its inode and its size and change times."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, file: BinaryIO) -> FileIdentity:
        st = os.fstat(file.fileno())
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class HashedFiles:
    """The sha256 of each file hashed in this process (or reported to it), by identity."""

    def __init__(self) -> None:
        self._digests: dict[FileIdentity, str] = {}
        self._lock = threading.Lock()
        self._report_fd: int | None = None
        self.hashed = 0  # files read and hashed by this process

    def digest(self, file: BinaryIO) -> tuple[str, DigestCheck]:
        """The digest of the open ``file`` and whether it was hashed now or known already."""
        before = FileIdentity.of(file)
        with self._lock:
            known = self._digests.get(before)
        if known is not None:
            return known, DigestCheck.REUSED
        started_ns = time.time_ns()
        file.seek(0)
        actual = hashlib.file_digest(file, "sha256").hexdigest()
        with self._lock:
            self.hashed += 1
        if FileIdentity.of(file) == before and started_ns - before.ctime_ns > RACY_WINDOW_NS:
            self.learn(before, actual)
            self._report(before, actual)
        return actual, DigestCheck.HASHED

    def learn(self, identity: FileIdentity, digest: str) -> None:
        with self._lock:
            self._digests[identity] = digest

    def learn_line(self, line: bytes) -> None:
        """Keeps a digest a forked replica reported (a line ``report_to``'s descriptor carried)."""
        try:
            message = json.loads(line)
            self.learn(FileIdentity(*message["identity"]), str(message["sha256"]))
        except (ValueError, KeyError, TypeError):
            pass  # not a report: the file is hashed again next time, nothing worse

    def report_to(self, fd: int) -> None:
        """From now on, also writes each digest kept to ``fd`` (non-blocking), one JSON line each."""
        self._report_fd = fd

    def _report(self, identity: FileIdentity, digest: str) -> None:
        if self._report_fd is None:
            return
        line = json.dumps({"identity": astuple(identity), "sha256": digest}).encode() + b"\n"
        # One write below PIPE_BUF is atomic; a full pipe drops the report (the next replica hashes again).
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._report_fd, line)


# One per process: a replica forked from the zygote starts with everything the zygote learnt.
HASHED_FILES = HashedFiles()


def file_sha256(path: Path) -> str:
    """The file's digest, read in chunks (a shard may be far larger than what is worth holding twice)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_file(file: BinaryIO, path: Path, expected: str, what: str) -> DigestCheck:
    """Raises ShardError naming ``what`` and ``path`` when the open ``file`` is not the one the plan recorded."""
    actual, check = HASHED_FILES.digest(file)
    if actual != expected:
        raise ShardError(
            f"{what} {path} is corrupt: its sha256 is {actual[:SHOWN_HEX]}..., "
            f"the plan recorded {expected[:SHOWN_HEX]}..."
        )
    return check


def verify_sha256(path: Path, expected: str, what: str) -> DigestCheck:
    """``verify_file`` for a file not yet open."""
    with path.open("rb") as file:
        return verify_file(file, path, expected, what)
