"""Files written whole or not at all: a reader (or a crash) sees the old file or the new one, never half.

Shards, the trunk, a downloaded shard and the routing profile are all written this way: a new file
beside the target, flushed to disk, then renamed over it. Renaming keeps running replicas' mappings of
the old file intact, where writing in place would change the pages under them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: Path, *, private: bool = False) -> Iterator[Path]:
    """Yields a new empty file beside ``target`` to write; on success it replaces ``target``.

    ``private``: the file is readable by this user only (0600); otherwise by the umask, as open() makes it.
    On an exception the partial file is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666))
    try:
        yield partial
        with partial.open("rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
