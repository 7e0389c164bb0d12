"""SHA-256 of a file, read in chunks: the one helper behind checkpoint, tower and sweep-model digests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """Hex SHA-256 of the file at ``path`` (of its first ``limit`` bytes and its size when ``limit`` is set)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(limit))
            h.update(str(Path(path).stat().st_size).encode())
    return h.hexdigest()
