"""Results: one JSON line per cell, appended with one ``write`` and flushed to disk as the cell finishes.

A line is written whole (a single ``os.write`` of the encoded line and its newline on an ``O_APPEND`` descriptor,
then ``fsync``), so a kill leaves at most a torn last line. ``ResultsStore`` reads every complete line, detects a torn
or unparseable last line, cuts it off (that cell is redone) and refuses corruption anywhere else.

A sweep holds the store ``open()``: an exclusive ``flock`` on the file for the sweep's lifetime (a second sweep on
the same file is refused with a message; the lock goes with the process, even on SIGKILL), taken before any cell runs,
which also proves the file can be written. A row with ``"failed"`` (the reason) records a cell that raised: it is not
finished, and the next run redoes it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ResultsStore:
    """The JSONL file of a sweep. ``rows()`` reads it; ``append(row)`` adds one finished cell durably."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def open(self) -> ResultsStore:
        """Open the file for appending and lock it (``flock``, exclusive) until ``close``; ``ValueError`` naming the
        file if it is a folder, cannot be written, or another sweep holds it."""
        if self.path.is_dir():
            raise ValueError(f"results: {self.path} is a folder; expected a results file path (e.g. "
                             f"{self.path / 'results.jsonl'})")
        for parent in self.path.parents:
            if parent.exists() and not parent.is_dir():
                raise ValueError(f"results: cannot write {self.path}: {parent} is a file, not a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(f"results: cannot write {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"results: {self.path} is in use by another sweep (it holds the file's lock); wait "
                             f"for it to finish, or write to another results file") from None
        self._fd = fd
        return self

    def close(self) -> None:
        """Release the lock (closing the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in file order (a torn last line is left out; see ``repair``)."""
        return list(self._parse(repair=False))

    def repair(self) -> int:
        """Cut a torn / unparseable last line off the file; returns how many bytes were removed."""
        before = self.path.stat().st_size if self.path.exists() else 0
        list(self._parse(repair=True))
        return before - (self.path.stat().st_size if self.path.exists() else 0)

    def finished(self) -> set[str]:
        """Ids of the cells with a complete row that did not fail."""
        return {r["id"] for r in self.rows() if "failed" not in r}

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
            if self._fd is not None:
                os.ftruncate(self._fd, offset)
                os.fsync(self._fd)
            else:
                with open(self.path, "r+b") as f:
                    f.truncate(offset)
                    f.flush()
                    os.fsync(f.fileno())
        yield from rows

    def append(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one line, durably (one write of the whole line, then fsync); through the locked
        descriptor when the store is ``open()``."""
        line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode()
        if self._fd is not None:
            _write_line(self._fd, line)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_line(fd, line)
        finally:
            os.close(fd)


def _write_line(fd: int, line: bytes) -> None:
    """One ``os.write`` of the whole line on an ``O_APPEND`` descriptor, then ``fsync``. A short write (a full disk)
    raises ``OSError`` after the line's bytes written so far are left as a torn last line, cut off on the next run."""
    n = os.write(fd, line)
    if n != len(line):
        raise OSError(f"short write to the results file ({n} of {len(line)} bytes; is the disk full?)")
    os.fsync(fd)
