"""Results: one JSON line per finished cell, appended with one ``write`` and flushed to disk.

A line is written whole (a single ``os.write`` of the encoded line and its newline on an ``O_APPEND`` descriptor,
then ``fsync``), so a kill leaves at most a torn last line. ``ResultsStore`` reads every complete line, detects a torn
or unparseable last line, cuts it off (that cell is redone) and refuses corruption anywhere else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ResultsStore:
    """The JSONL file of a sweep. ``rows()`` reads it; ``append(row)`` adds one finished cell durably."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (a torn last line is left out; see ``repair``)."""
        return list(self._parse(repair=False))

    def repair(self) -> int:
        """Cut a torn / unparseable last line off the file; returns how many bytes were removed."""
        before = self.path.stat().st_size if self.path.exists() else 0
        list(self._parse(repair=True))
        return before - (self.path.stat().st_size if self.path.exists() else 0)

    def finished(self) -> set[str]:
        """Ids of the cells with a complete row."""
        return {r["id"] for r in self.rows()}

    def _parse(self, repair: bool) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        *complete, tail = self.path.read_bytes().split(b"\n")  # tail: bytes after the last newline (torn if any)
        rows, offset = [], 0
        for i, raw in enumerate(complete):
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or "id" not in row:
                if i < len(complete) - 1 or tail:
                    raise ValueError(f"{self.path}: line {i + 1} is corrupt and is not the last line; fix or remove "
                                     f"it by hand (a sweep only ever tears its last line)")
                tail = b"x"  # an unparseable last line: cut off like a torn one
                break
            rows.append(row)
            offset += len(raw) + 1
        if tail and repair:
            with open(self.path, "r+b") as f:
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
        yield from rows

    def append(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line, durably (one write, then fsync)."""
        line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
