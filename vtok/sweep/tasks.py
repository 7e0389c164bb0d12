"""The task registry: what a sweep cell measures, on which models, at which placements.

A task is an object with ``name``, ``placements`` (the default ones), ``defaults`` (its options) and the checks the
config calls before any cell runs (``resolve_options``, ``check_placement``, ``check_method``, ``check_model``),
``fingerprint(model)`` (what identifies the weights, part of each cell's id) and ``run(cells, progress)``, which
yields ``(cell, part)`` with ``part = {"metrics": {...}, "timing": {...}}`` (``timing``: wall-clock values, the only
ones that differ between two runs) or ``{"error": message}`` for a cell that cannot run (a budget a method cannot
make). Register with ``register_task(obj)``; built-in tasks are imported lazily by ``get_task``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TASKS: dict[str, Any] = {}
# built-in task modules, imported on first look-up (they import torch / timm / transformers)
_BUILTIN = ("vtok.sweep.vit_task", "vtok.sweep.vlm_task")

Progress = Callable[[int, int], None]  # (done, total) steps of the running shard


class Task:
    """Base class: option handling and default checks. Subclasses set ``name``, ``placements``, ``defaults``."""

    name: str = ""
    description: str = ""
    placements: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}
    required: tuple[str, ...] = ()

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The task's options: defaults updated by ``given``; an unknown option or a wrong type is named."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"task_options.{self.name}: unknown option(s) {unknown}; options: {sorted(self.defaults)}")
        out = dict(self.defaults)
        for k, v in given.items():
            d = self.defaults[k]
            if d is not None and v is not None and not isinstance(v, type(d)) and not (
                    isinstance(d, float) and isinstance(v, int) and not isinstance(v, bool)):
                raise ValueError(f"task_options.{self.name}.{k}: expected {type(d).__name__}, got {v!r}")
            out[k] = v
        for k in self.required:
            if out.get(k) is None:
                raise ValueError(f"task_options.{self.name}.{k}: required (see `vtok sweep --help`)")
        return out

    def check_placement(self, placement: str) -> None:
        if placement not in self.placements:
            raise ValueError(f"placements: {placement!r} is not a placement of task {self.name!r}; "
                             f"choose from {list(self.placements)}")

    def check_method(self, method: str, placement: str) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if ``placement`` cannot feed ``method`` the context it needs."""

    def check_model(self, model: str, options: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if ``model`` is not a model this task can load."""

    def fingerprint(self, model: str) -> str:
        return ""

    def run(self, cells: list, progress: Progress) -> Iterator[tuple[Any, dict]]:
        raise NotImplementedError


class Unavailable(Task):
    """A registry slot for a task that does not exist yet: naming it in a config fails with ``reason``."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason


def register_task(task: Task) -> Task:
    """Add ``task`` to the registry (replacing an ``Unavailable`` slot of the same name)."""
    old = TASKS.get(task.name)
    if old is not None and not isinstance(old, Unavailable) and old is not task:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def _load_builtin() -> None:
    for mod in _BUILTIN:
        importlib.import_module(mod)


def get_task(name: str) -> Task:
    """The registered task ``name``; unknown or not-yet-available names raise ``ValueError``."""
    _load_builtin()
    task = TASKS.get(name)
    if task is None:
        raise ValueError(f"tasks: unknown task {name!r}; registered: {sorted(TASKS)}")
    if isinstance(task, Unavailable):
        raise ValueError(f"tasks: {name!r} is not available yet: {task.reason}")
    return task


def file_digest(path: Path, limit: int | None = None) -> str:
    """SHA-256 of a file (its first ``limit`` bytes and its size when ``limit`` is set)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if limit is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(limit))
            h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]
