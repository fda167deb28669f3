"""Damage a safetensors file the way a bad disk or a truncated-then-patched copy does: header intact."""

from __future__ import annotations

import struct
from pathlib import Path

HEADER_LENGTH_BYTES = 8  # safetensors: a little-endian u64 header length, the JSON header, then tensor data


def tensor_data_offset(path: Path) -> int:
    with path.open("rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(HEADER_LENGTH_BYTES))
    return HEADER_LENGTH_BYTES + header_length


def flip_tensor_bytes(path: Path, count: int = 4) -> None:
    """Inverts ``count`` bytes in the middle of the tensor data: the file still parses, a weight is wrong."""
    start = tensor_data_offset(path)
    middle = start + (path.stat().st_size - start) // 2
    with path.open("r+b") as f:
        f.seek(middle)
        original = f.read(count)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in original))
