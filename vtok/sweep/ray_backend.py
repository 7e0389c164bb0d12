"""``--backend ray``: one Ray task per shard, streaming its rows back; the driver alone appends them to the file.

Workers import vtok and run ``runner.run_shard`` on their shard, yielding each row as its cell finishes (a Ray
streaming generator); the driver writes every row the moment it arrives (``ray.wait`` over the shards), so a kill
loses only the cells still running. The task object travels with its shard, so a task registered in the driver
(``register_task``) runs on the workers too. A worker that dies marks its shard's unfinished cells failed (redone
on the next run). Pass ``address`` to join a cluster (``ray start --head`` on one machine, ``ray start
--address=...`` on the others); an address nobody answers at is refused before any cell runs. Without it a local
instance starts (or the one this process already joined is used). Every worker needs vtok installed and the model
files at the same paths.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

INSTALL = "--backend ray needs Ray, an optional extra: pip install 'vtok[ray]' (or: pip install 'ray>=2.9')"


def require_ray():
    """The ``ray`` module, or a ``RuntimeError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(INSTALL) from None
    return ray


def _unreachable(address: str, reason: str) -> RuntimeError:
    return RuntimeError(f"--address {address}: no Ray cluster answers there ({reason}); start one with `ray start "
                        f"--head`, or leave --address out for a local instance")


def check_address(address: str, timeout: float = 5.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address must accept a TCP connection; ``RuntimeError`` if not."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep:
        return  # "auto", "local": Ray resolves those itself
    if not port.isdigit():
        raise RuntimeError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379), 'auto' or 'local'")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or str(e) or type(e).__name__) from None


def connect(address: str | None) -> bool:
    """Join ``address`` (or start a local instance) unless this process already joined one; ``True`` if this call
    started the connection (the caller shuts it down). Raises ``RuntimeError`` naming ``--address``."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address:
        check_address(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, TimeoutError) as e:
        raise _unreachable(address or "(local)", str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return True


def _shard_rows(cells: list, task: Any) -> Iterator[dict[str, Any]]:
    """What a worker runs: every row of its shard, one at a time as its cells finish."""
    from vtok.sweep.runner import run_shard

    yield from run_shard(cells, task=task)


def run_ray(parts: list[list], on_row: Callable[[dict[str, Any]], None], cpus_per_task: float = 1.0) -> None:
    """Run every shard as a Ray task (this process must have joined Ray: ``connect``) and hand each row to
    ``on_row`` here as soon as its cell finishes."""
    ray = require_ray()
    from vtok.sweep.runner import failed_row
    from vtok.sweep.tasks import get_task

    remote = ray.remote(num_cpus=cpus_per_task)(_shard_rows).options(num_returns="streaming")
    gens = {remote.remote(p, get_task(p[0].task)): (p, set()) for p in parts}
    pending = list(gens)
    while pending:
        ready, _ = ray.wait(pending, num_returns=1)
        for gen in ready:
            cells, done = gens[gen]
            try:
                row = ray.get(next(gen))
            except StopIteration:
                pending.remove(gen)
                continue
            except Exception as e:  # noqa: BLE001 - a worker died: its shard's unfinished cells failed
                pending.remove(gen)
                reason = f"Ray worker lost: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for c in cells:
                    if c.id not in done:
                        on_row(failed_row(c, reason))
                continue
            done.add(row["id"])
            on_row(row)
