"""Run a sweep: expand the grid, skip the cells the results file already holds, run the rest shard by shard.

``run_sweep(config, results)`` appends one row per finished cell to ``results`` (see ``store.py``), so re-running
the same command after Ctrl-C, a crash or a kill continues where it stopped. Cells of one task and model run in
shards of ``config.shard_size`` (they share the model load and the unpruned forward); a shard's rows are written as
its cells finish. Backends: ``local`` (this process, a rich progress bar) and ``ray`` (``vtok.sweep.ray_backend``:
one Ray task per shard, rows written by this driver only).
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
    """Versions of what decides a cell's numbers."""
    import torch

    import vtok

    out = {"vtok": vtok.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("timm", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def shards(cells: list[Cell], size: int) -> list[list[Cell]]:
    """Cells grouped by (task, model, task options), in grid order, cut into chunks of at most ``size``."""
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        key = json.dumps([c.task, c.model, c.fingerprint, c.task_options], sort_keys=True, default=str)
        groups.setdefault(key, []).append(c)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_shard(cells: list[Cell], progress: Progress | None = None) -> Iterator[dict[str, Any]]:
    """Rows of one shard's cells, as the task finishes them."""
    task = get_task(cells[0].task)
    ver, host = versions(), platform.node()
    t0 = time.time()
    for cell, part in task.run(cells, progress or (lambda done, total: None)):
        now = time.time()
        row = {"id": cell.id, "cell": cell.key(), "seed": cell.seed, "versions": ver, "host": host,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
               "metrics": part.get("metrics", {}), "timing": {**part.get("timing", {}), "shard_seconds": now - t0}}
        if "error" in part:
            row["error"] = part["error"]
        yield row


@dataclass
class Summary:
    """What a run did: cells in the grid, already finished before it, run now, failed (n/a), seconds."""

    total: int
    skipped: int
    ran: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_sweep(config: SweepConfig, results: str, backend: str = "local", address: str | None = None,
              show_progress: bool = True, console=None,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> Summary:
    """Run every cell of ``config`` not yet in ``results``; returns a ``Summary`` (``rows``: every row of this grid).

    ``backend="ray"`` fans the shards out over Ray (``address``: a cluster, default a local instance or the one
    this process already joined)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {list(BACKENDS)}")
    if backend == "ray":
        from vtok.sweep.ray_backend import require_ray

        require_ray()
    store = ResultsStore(results)
    store.repair()  # a torn last line (killed mid-write) is cut off and its cell redone
    cells = config.cells()
    done = store.finished()
    todo = [c for c in cells if c.id not in done]
    summary = Summary(total=len(cells), skipped=len(cells) - len(todo))
    t0 = time.time()

    def commit(row: dict[str, Any]) -> None:
        store.append(row)
        summary.ran += 1
        if "error" in row:
            summary.errors.append(f"{Cell(**row['cell']).label()}: {row['error']}")
        if on_row is not None:
            on_row(row)
        if not show_progress and console is not None:  # logs: one line per finished cell
            what = row.get("error") or ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items()
                                                 if isinstance(v, float))
            console.print(f"[{summary.ran}/{len(todo)}] {Cell(**row['cell']).label()}: {what}", markup=False,
                          highlight=False)

    parts = shards(todo, config.shard_size)
    if todo:
        if backend == "ray":
            from vtok.sweep.ray_backend import run_ray

            with _progress(show_progress, console) as prog:
                overall = prog.add_task("cells (ray)", total=len(todo))
                run_ray(parts, address, lambda row: (commit(row), prog.advance(overall)))
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
    summary.rows = [r for r in store.rows() if r["id"] in ids]
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
