"""The task registry: what a sweep cell measures, on which models, at which placements.

A task is an object with ``name``, ``placements`` (the default ones), ``options`` (its declared options: an
``Option`` each, with type, range and default) and the checks the config calls before any cell runs
(``resolve_options``, ``check_placement``, ``check_method``, ``check_model``, ``check_cell``), ``fingerprint(model)``
(what identifies the weights, part of each cell's id) and ``run(cells, progress)``, which yields ``(cell, part)``
as each cell finishes, with ``part = {"metrics": {...}, "timing": {...}}`` (``timing``: wall-clock values, the only
ones that differ between two runs) or ``{"error": message}`` for a cell that cannot run by its nature (a budget a
method cannot make: recorded as ``n/a``, a finished result). An exception out of ``run`` marks the shard's
unfinished cells *failed* (retried on the next run). Register with ``register_task(obj)``; built-in tasks are
imported lazily by ``get_task``. A task registered in the driver also runs on Ray workers (it travels with the shard).
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS: dict[str, Any] = {}
# built-in task modules, imported on first look-up (they import torch / timm / transformers)
_BUILTIN = ("vtok.sweep.vit_task", "vtok.sweep.vlm_task")

Progress = Callable[[int, int], None]  # (done, total) steps of the running shard


@dataclass(frozen=True)
class Option:
    """One declared task option: its type (``int``, ``float``, ``str``), range and default.

    ``minimum`` / ``maximum`` bound numbers (inclusive); ``optional``: ``None`` (absent) is allowed and means what
    ``doc`` says; ``required``: it must be given."""

    kind: type
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False
    required: bool = False
    doc: str = ""

    def expected(self) -> str:
        """What a valid value is, in words (for error messages)."""
        what = {int: "an int", float: "a number", str: "a string"}.get(self.kind, self.kind.__name__)
        lo, hi = self.minimum, self.maximum
        rng = (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None
               else f" <= {hi:g}" if hi is not None else "")
        return what + rng + (" or absent" if self.optional else "")

    def check(self, label: str, value: Any) -> Any:
        """``value`` if it fits (an int is accepted for a float option), else ``ValueError`` naming ``label``."""
        if value is None:
            if self.optional or (not self.required and self.default is None):
                return None
            raise ValueError(f"{label}: expected {self.expected()}, got nothing")
        numeric = self.kind in (int, float)
        ok = (not isinstance(value, bool) and isinstance(value, numbers.Integral if self.kind is int else
                                                         numbers.Real)) if numeric else isinstance(value, self.kind)
        if not ok:
            raise ValueError(f"{label}: expected {self.expected()}, got {value!r}")
        if numeric and ((self.minimum is not None and value < self.minimum)
                        or (self.maximum is not None and value > self.maximum)):
            raise ValueError(f"{label}: {value!r} is out of range (expected {self.expected()})")
        return int(value) if self.kind is int else float(value) if self.kind is float else value


class Task:
    """Base class: option handling and default checks. Subclasses set ``name``, ``placements``, ``options``."""

    name: str = ""
    description: str = ""
    placements: tuple[str, ...] = ()
    options: dict[str, Option] = {}

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option's default value."""
        return {k: o.default for k, o in self.options.items()}

    def check_options(self, given: dict[str, Any], prefix: str | None = None) -> dict[str, Any]:
        """``given`` checked against the declared options (name, type, range); ``prefix`` names them in errors
        (default ``task_options.<task>``; the CLI passes ``--task-option <task>``)."""
        prefix = f"task_options.{self.name}" if prefix is None else prefix
        if not isinstance(given, dict):
            raise ValueError(f"{prefix}: expected a mapping option -> value, got {given!r}")
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(f"{prefix}: unknown option(s) {unknown}; options: {sorted(self.options)}")
        return {k: self.options[k].check(f"{prefix}.{k}", v) for k, v in given.items()}

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The task's options: defaults updated by ``given``; an unknown option, a wrong type or a value out of
        range is named. A required option left out is named too."""
        out = {**self.defaults, **self.check_options(given)}
        for k, o in self.options.items():
            if o.required and out.get(k) is None:
                raise ValueError(f"task_options.{self.name}.{k}: required (see `vtok sweep --help`)")
        return out

    def check_placement(self, placement: str) -> None:
        if placement not in self.placements:
            raise ValueError(f"placements: {placement!r} is not a placement of task {self.name!r}; "
                             f"choose from {list(self.placements)}")

    def check_method(self, method: str, placement: str) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if ``placement`` cannot feed ``method`` the context it needs."""

    def check_model(self, model: str, options: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if ``model`` is not a model this task can load (or ``options`` do not fit it)."""

    def check_cell(self, model: str, method: str, keep: float | int, placement: str,  # noqa: B027 - optional hook
                   method_options: dict[str, Any]) -> None:
        """Raise ``ValueError`` if this model cannot run ``method`` at ``placement`` (the real placement's context,
        layer range, options); called for every model x method x keep x placement before any cell runs."""

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
    """SHA-256 of a file (its first ``limit`` bytes and its size when ``limit`` is set), 16 hex digits."""
    from vtok.bench.digest import file_sha256

    return file_sha256(path, limit)[:16]
