"""Resident memory of a process, split so that file-mapped weight pages are not counted as copies.

Shards are mapped (faasmoe.experts.shard): their pages count in rss, file and pss once a forward pass
touches them, pss dividing each page among the processes that map it, and never in anon.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ResidentMemory:
    rss: int  # bytes resident in all
    anon: int  # private anonymous pages (tensors copied into memory)
    file: int  # file-backed pages (mmapped checkpoints, libraries)
    pss: int  # proportional set size: shared pages divided among their users

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def resident_memory(pid: int | None = None) -> ResidentMemory:
    pid = pid or os.getpid()
    status = _status_fields(Path(f"/proc/{pid}/status"))
    info = psutil.Process(pid).memory_full_info()
    return ResidentMemory(
        rss=info.rss,
        anon=status.get("RssAnon", 0),
        file=status.get("RssFile", 0) + status.get("RssShmem", 0),
        pss=getattr(info, "pss", info.rss),
    )


def _status_fields(path: Path) -> dict[str, int]:
    fields = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields
