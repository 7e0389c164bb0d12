"""Run a sweep: expand the grid, skip the cells the results file already holds, run the rest shard by shard.

``run_sweep(config, results)`` first takes an exclusive lock on ``results`` (which also proves it can be written;
a second sweep on the same file is refused), then appends one row per cell the moment the cell finishes (see
``store.py``), so re-running the same command after Ctrl-C, a crash or a kill continues where it stopped and
redoes only unfinished cells. Cells of one task and model run in shards of ``config.shard_size`` (they share the
model load and the unpruned forward). A cell whose task raises is written as *failed* (with the reason), counted in
the ``Summary`` and redone on the next run. Backends: ``local`` (this process, a rich progress bar) and ``ray``
(``vtok.sweep.ray_backend``: one Ray task per shard, its rows streamed back and written by this driver only).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vtok.sweep.config import Cell, SweepConfig
from vtok.sweep.store import ResultsStore
from vtok.sweep.tasks import Progress, get_task

BACKENDS = ("local", "ray")


def versions() -> dict[str, str]:
    """Versions of what decides a cell's numbers (read from the installed packages' metadata: importing
    transformers only to read its version would cost seconds per shard)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import vtok

    out = {"vtok": vtok.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("timm", "transformers"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            pass
    return out


def shards(cells: list[Cell], size: int) -> list[list[Cell]]:
    """Cells grouped by (task, model, task options), in grid order, cut into chunks of at most ``size``."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        key = json.dumps([c.task, c.model, c.fingerprint, c.task_options], sort_keys=True, default=str)
        groups.setdefault(key, []).append(c)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def failed_row(cell: Cell, reason: str, ver: dict[str, str] | None = None, host: str | None = None) -> dict[str, Any]:
    """The row of a cell that raised: ``failed`` says why; the next run redoes it."""
    return {"id": cell.id, "cell": cell.key(), "seed": cell.seed, "versions": ver or versions(),
            "host": host or platform.node(), "finished": _now(), "metrics": {}, "timing": {}, "failed": reason}


def run_shard(cells: list[Cell], progress: Progress | None = None, task: Any = None) -> Iterator[dict[str, Any]]:
    """Rows of one shard's cells, each as the task finishes it (``task``: default the registered one). If the task
    raises, every cell of the shard without a row yet gets a failed row with the exception's first line."""
    task = task if task is not None else get_task(cells[0].task)
    ver, host = versions(), platform.node()
    t0 = time.time()
    done: set[str] = set()
    try:
        for cell, part in task.run(cells, progress or (lambda done, total: None)):
            now = time.time()
            row = {"id": cell.id, "cell": cell.key(), "seed": cell.seed, "versions": ver, "host": host,
                   "finished": _now(), "metrics": part.get("metrics", {}),
                   "timing": {**part.get("timing", {}), "shard_seconds": now - t0}}
            if "error" in part:
                row["error"] = part["error"]
            done.add(cell.id)
            yield row
    except Exception as e:  # noqa: BLE001 - any failure of a cell is recorded, never lost or fatal to the sweep
        reason = _first_line(e)
        for c in cells:
            if c.id not in done:
                yield failed_row(c, reason, ver, host)


@dataclass
class Summary:
    """What a run did: cells in the grid, already finished before it, run now, n/a (``errors``: a budget the method
    cannot make, a finished result), failed (``failed``: raised; redone on the next run), seconds."""

    total: int
    skipped: int
    ran: int = 0
    errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def failure_reasons(self) -> dict[str, int]:
        """Reason -> how many cells of the grid are left failed with it (after this run)."""
        out: dict[str, int] = {}
        for r in self.rows:
            if "failed" in r:
                out[r["failed"]] = out.get(r["failed"], 0) + 1
        return out


def run_sweep(config: SweepConfig, results: str, backend: str = "local", address: str | None = None,
              show_progress: bool = True, console=None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Run every cell of ``config`` not yet finished in ``results``; returns a ``Summary`` (``rows``: the latest row
    of every cell of this grid).

    Before any cell runs: the backend (``ray``: installed, ``address`` answering), then an exclusive lock on
    ``results`` (a folder, an unwritable file or another sweep holding it raises ``ValueError`` naming the file).
    ``backend="ray"`` fans the shards out over Ray (``address``: a cluster, default a local instance or the one
    this process already joined)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {list(BACKENDS)}")
    started = False
    if backend == "ray":
        from vtok.sweep.ray_backend import connect, require_ray

        require_ray()
        started = connect(address)
    try:
        with ResultsStore(results) as store:
            return _run_locked(config, store, backend, show_progress, console, on_row)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run_locked(config: SweepConfig, store: ResultsStore, backend: str, show_progress: bool, console,
                on_row: Callable[[dict[str, Any]], None] | None) -> Summary:
    """``run_sweep`` once the results file is locked."""
    store.repair()  # a torn last line (killed mid-write) is cut off and its cell redone
    cells = config.cells()
    done = store.finished()
    todo = [c for c in cells if c.id not in done]
    summary = Summary(total=len(cells), skipped=len(cells) - len(todo))
    t0 = time.time()

    def commit(row: dict[str, Any]) -> None:
        store.append(row)
        summary.ran += 1
        label = Cell(**row["cell"]).label()
        if "failed" in row:
            summary.failed.append(f"{label}: {row['failed']}")
        elif "error" in row:
            summary.errors.append(f"{label}: {row['error']}")
        if on_row is not None:
            on_row(row)
        if not show_progress and console is not None:  # logs: one line per finished cell
            what = (f"FAILED {row['failed']}" if "failed" in row else row.get("error")
                    or ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if isinstance(v, float)))
            console.print(f"[{summary.ran}/{len(todo)}] {label}: {what}", markup=False, highlight=False)

    parts = shards(todo, config.shard_size)
    if todo:
        if backend == "ray":
            from vtok.sweep.ray_backend import run_ray

            with _progress(show_progress, console) as prog:
                overall = prog.add_task("cells (ray)", total=len(todo))
                run_ray(parts, lambda row: (commit(row), prog.advance(overall)))
        else:
            with _progress(show_progress, console) as prog:
                overall = prog.add_task("all cells", total=len(todo))
                for i, shard in enumerate(parts):
                    names = ", ".join(sorted({c.method for c in shard}))
                    cur = prog.add_task(f"shard {i + 1}/{len(parts)}: {shard[0].task} {names}", total=None)
                    for row in run_shard(shard, lambda d, n, cur=cur: prog.update(cur, completed=d, total=n)):
                        commit(row)
                        prog.advance(overall)
                    prog.remove_task(cur)
    summary.seconds = time.time() - t0
    ids = {c.id for c in cells}
    latest = {r["id"]: r for r in store.rows() if r["id"] in ids}  # a redone failed cell: its last row wins
    summary.rows = list(latest.values())
    return summary


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *a, **k) -> int:
        return 0

    def advance(self, *a, **k) -> None:
        pass

    def update(self, *a, **k) -> None:
        pass

    def remove_task(self, *a, **k) -> None:
        pass


def _progress(show: bool, console=None):
    """A rich progress display (overall cells and the running shard, each with its ETA), or a silent stand-in."""
    if not show:
        return _NoProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console)
