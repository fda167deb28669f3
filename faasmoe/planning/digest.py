"""SHA-256 digests of a plan's weight files: `faasmoe export` records them, whoever loads a file checks it.

Torch-free: the function server imports this (through its settings) before torch is imported.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from pydantic import StringConstraints

from faasmoe.errors import ShardError

# Lowercase hex, as hashlib writes it; upper case is accepted from a hand-written value and lowered.
Sha256 = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")]
# Enough of a digest to tell two apart in an error message.
SHOWN_HEX = 12


def file_sha256(path: Path) -> str:
    """The file's digest, read in chunks (a shard may be far larger than what is worth holding twice)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raises ShardError naming ``what`` and ``path`` when the file is not the one the plan recorded."""
    actual = file_sha256(path)
    if actual != expected:
        raise ShardError(
            f"{what} {path} is corrupt: its sha256 is {actual[:SHOWN_HEX]}..., "
            f"the plan recorded {expected[:SHOWN_HEX]}..."
        )
