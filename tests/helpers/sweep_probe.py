"""A test-registered sweep task, ``probe``: no model, deterministic metrics, a sleep per cell, failures on demand.

The cheapest task the sweep machinery can run: each cell's ``value`` is a hash of its id (so a redone cell gives the
same row), ``delay`` seconds pass per cell (so a kill can land mid-shard), and a cell whose method is in
``Probe.fail`` raises. ``python tests/helpers/sweep_probe.py RESULTS BACKEND [ADDRESS]`` runs ``GRID`` (exit 1
when a cell failed). ``python tests/helpers/sweep_probe.py --zygote`` imports vtok once, then forks one sweep process
per ``run RESULTS BACKEND [ADDRESS]`` line on stdin and prints its pid; ``wait PID`` prints its exit status as
``subprocess`` gives it (``-9``: killed by SIGKILL). The fault-injection test kills those processes: each is a whole
sweep driver, started without paying the imports again.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from vtok.sweep import TASKS, Task, load_config, register_task, run_sweep
from vtok.sweep.tasks import Option

GRID = {"name": "probe", "tasks": ["probe"], "models": ["m"], "methods": ["random", "uniform", "divprune", "tome"],
        "keeps": [0.9, 0.7, 0.5, 0.3, 0.1], "seeds": [0, 1, 2], "shard_size": 4,
        "task_options": {"probe": {"delay": 0.02}}}


class Probe(Task):
    """``value``: a hash of the cell's id in [0, 1); ``kept_tokens``: ``keep`` of 100 tokens."""

    name = "probe"
    description = "test task: a hash per cell, a sleep per cell"
    placements = ("here",)
    options = {"delay": Option(float, 0.0, minimum=0.0, doc="seconds per cell")}
    fail: set[str] = set()  # methods whose cells raise

    def run(self, cells, progress):
        for i, c in enumerate(cells):
            time.sleep(c.task_options["delay"])
            if c.method in self.fail:
                raise RuntimeError(f"probe: {c.method} was told to fail")
            value = int(hashlib.sha256(c.id.encode()).hexdigest()[:8], 16) / 2**32
            kept = round(c.keep * 100) if isinstance(c.keep, float) else c.keep
            yield c, {"metrics": {"value": value, "kept_tokens": kept}}
            progress(i + 1, len(cells))


def probe() -> Probe:
    """The registered ``probe`` task (registered on first call)."""
    return TASKS.get("probe") or register_task(Probe())


def rows_of(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a results file (each line must parse)."""
    import json

    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def main(argv: list[str]) -> int:
    results, backend, address = argv[0], argv[1], (argv[2] if len(argv) > 2 else None)
    probe()  # run as a script, the class lives in __main__: Ray pickles it by value, workers need no copy
    summary = run_sweep(load_config(GRID), results, backend=backend, address=address, show_progress=False)
    return 1 if summary.failed else 0


def zygote() -> None:
    """Serve ``run ...`` / ``wait PID`` lines from stdin (see the module docstring) until ``quit`` or EOF."""
    import torch  # noqa: F401 - imported once here, inherited by every forked sweep

    import vtok.sweep.runner  # noqa: F401

    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "run":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    sys.stdin.close()
                    code = main(args)
                except BaseException:  # noqa: BLE001 - shown on stderr, then the child's exit status says it failed
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            print(pid, flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(args[0]), 0)
            print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
        else:
            return


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        sys.exit(main(sys.argv[1:]))
