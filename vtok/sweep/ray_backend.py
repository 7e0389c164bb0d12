"""``--backend ray``: one Ray task per shard; the driver alone appends the rows to the results file.

Workers import vtok and run ``runner.run_shard`` on their shard, returning its rows; the driver collects them as
tasks finish (``ray.wait``). Pass ``address`` to join a cluster (``ray start --head`` on one machine, ``ray start
--address=...`` on the others); without it a local instance starts (or the one this process already joined is used).
Every worker needs vtok installed and the model files at the same paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

INSTALL = "--backend ray needs Ray, an optional extra: pip install 'vtok[ray]' (or: pip install 'ray>=2.9')"


def require_ray():
    """The ``ray`` module, or a ``RuntimeError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL) from None
    return ray


def _shard_rows(cells: list) -> list[dict[str, Any]]:
    """What a worker runs: every row of its shard."""
    from vtok.sweep.runner import run_shard

    return list(run_shard(cells))


def run_ray(parts: list[list], address: str | None, on_row: Callable[[dict[str, Any]], None],
            cpus_per_task: float = 1.0) -> None:
    """Run every shard as a Ray task and hand each row to ``on_row`` (in this process) as its shard finishes."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        remote = ray.remote(num_cpus=cpus_per_task)(_shard_rows)
        pending = [remote.remote(p) for p in parts]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for rows in ray.get(done):
                for row in rows:
                    on_row(row)
    finally:
        if started:
            ray.shutdown()
