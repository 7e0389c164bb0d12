"""Sweeps under faults (issue #29): killed at random points 20 times (local and Ray) the results still equal an
uninterrupted run's; a cell that raises is failed, retried and makes the exit status non-zero; the results file is
locked, checked writable before any cell runs, and each row is written as its cell finishes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import ROOT, sweep_probe
from tests.helpers.sweep_helpers import comparable
from tests.helpers.sweep_probe import GRID, Probe, probe, rows_of
from vtok.cli import app
from vtok.sweep import ResultsStore, load_config, run_sweep

ray = pytest.importorskip("ray", reason="ray is not installed (it is in the dev extra: pip install -e '.[dev]')")
N_CELLS = 4 * 5 * 3
KILLS = {"local": 12, "ray": 8}  # 20 kills in all


@pytest.fixture(autouse=True)
def registered():
    probe()
    Probe.fail = set()
    yield
    Probe.fail = set()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The probe grid run once, uninterrupted, in this process."""
    probe()
    path = tmp_path_factory.mktemp("straight") / "r.jsonl"
    return run_sweep(load_config(GRID), str(path), show_progress=False).rows


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_unreachable_ray_address_is_refused_before_any_cell(tmp_path):
    """Runs before the module's Ray instance starts: this process has not joined Ray yet."""
    assert not ray.is_initialized()
    out = tmp_path / "r.jsonl"
    t = time.time()
    with pytest.raises(RuntimeError, match=r"--address 127.0.0.1:1: no Ray cluster answers there"):
        run_sweep(load_config(GRID), str(out), backend="ray", address="127.0.0.1:1", show_progress=False)
    assert time.time() - t < 10 and not out.exists()
    res = CliRunner().invoke(app, ["sweep", "--task", "probe", "--model", "m", "--methods", "random", "--keep",
                                   "0.5", "--results", str(out), "--backend", "ray", "--address", "127.0.0.1:1"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--address 127.0.0.1:1" in res.output
    assert "Traceback" not in res.output and not out.exists()


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance (two CPUs) that the killed drivers join by address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


class Zygote:
    """``sweep_probe.py --zygote``: vtok imported once; each ``run`` forks a whole sweep driver process."""

    def __init__(self, log: Path):
        self.log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, sweep_probe.__file__, "--zygote"],
                                     cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def _ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def run(self, *args: str) -> int:
        """Start a sweep driver (``sweep_probe.main(args)``); its pid."""
        return self._ask("run " + " ".join(args))

    def wait(self, pid: int) -> int:
        """Its exit status (``-9``: SIGKILL)."""
        return self._ask(f"wait {pid}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    log = tmp_path_factory.mktemp("zygote") / "stderr.txt"
    z = Zygote(log)
    yield z
    z.close()


def _running(pid: int) -> bool:
    """The process has not exited (a zombie, exited but not yet reaped, counts as exited)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_killed_at_random_points_then_resumed_equals_uninterrupted(backend, straight, cluster, zygote, tmp_path):
    """SIGKILL the sweep driver KILLS[backend] times at seeded random points (during start-up, or after 1-2 new rows
    plus a random delay; sometimes with a torn line appended, as a kill mid-write would leave); then one run to the
    end. Every line parses, every cell appears exactly once, and the rows equal the uninterrupted run's."""
    rng = random.Random(29 + len(backend))
    out = tmp_path / "r.jsonl"
    args = [str(out), backend] + ([cluster] if backend == "ray" else [])
    for _ in range(KILLS[backend]):
        before, more, extra = _lines(out), rng.choice([0, 1, 1, 2]), rng.uniform(0.0, 0.05)
        pid = zygote.run(*args)
        deadline = time.time() + (rng.uniform(0.05, 1.0) if more == 0 else 120)
        while _lines(out) < before + max(more, 1) and _running(pid) and time.time() < deadline:
            time.sleep(0.003)
        time.sleep(extra)
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL, zygote.log.name
        if rng.random() < 0.3:
            with open(out, "ab") as f:  # as if the kill had torn a line mid-write
                f.write(b'{"id": "torn", "cell": {"ta')
    assert _lines(out) < N_CELLS, "the kills came after the end: nothing was interrupted"
    assert zygote.wait(zygote.run(*args)) == 0, zygote.log.name
    rows = rows_of(out)
    assert len(rows) == N_CELLS and len({r["id"] for r in rows}) == N_CELLS  # no duplicate, none missing
    assert not any("failed" in r or "error" in r for r in rows)
    assert comparable(rows) == comparable(straight)


def test_ray_rows_are_written_as_each_cell_finishes(cluster, tmp_path):
    """One shard of four slow cells on Ray: the driver writes each row when its cell finishes, not at the shard's
    end (before: the worker returned the whole shard at once)."""
    ray.cloudpickle.register_pickle_by_value(sweep_probe)
    cfg = load_config({**GRID, "methods": ["random"], "keeps": [0.5, 0.25], "seeds": [0, 1], "shard_size": 4,
                       "task_options": {"probe": {"delay": 0.6}}})
    out = tmp_path / "r.jsonl"
    seen: list[tuple[float, int]] = []
    run_sweep(cfg, str(out), backend="ray", show_progress=False,
              on_row=lambda row: seen.append((time.time(), _lines(out))))
    assert [n for _, n in seen] == [1, 2, 3, 4]  # each row is on disk when the driver hands it on
    gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)]
    assert min(gaps) > 0.3, gaps


def test_local_rows_are_on_disk_as_each_cell_finishes(tmp_path):
    cfg = load_config({**GRID, "methods": ["random"], "keeps": [0.5, 0.25], "seeds": [0, 1], "shard_size": 4})
    out = tmp_path / "r.jsonl"
    seen: list[int] = []
    run_sweep(cfg, str(out), show_progress=False, on_row=lambda row: seen.append(_lines(out)))
    assert seen == [1, 2, 3, 4]


def test_a_cell_that_raises_is_failed_retried_and_exits_nonzero(tmp_path):
    out = tmp_path / "r.jsonl"
    args = ["sweep", "--task", "probe", "--model", "m", "--methods", "random,divprune", "--keep", "0.5,0.25",
            "--shard-size", "1", "--results", str(out), "--no-progress", "--no-report"]
    Probe.fail = {"divprune"}
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "4 cells: 0 already in" in res.output and "2 failed" in res.output
    assert "failed (2 cells): RuntimeError: probe: divprune was told to fail" in res.output
    rows = rows_of(out)
    assert sorted(("failed" in r, r["cell"]["method"]) for r in rows) == [(False, "random")] * 2 + [
        (True, "divprune")] * 2
    assert len(ResultsStore(out).finished()) == 2  # failed rows are not finished
    Probe.fail = set()
    res = CliRunner().invoke(app, args)  # the next run redoes exactly the failed cells
    assert res.exit_code == 0, res.output
    assert "4 cells: 2 already in" in res.output and "2 run now" in res.output and "0 failed" in res.output
    assert len(ResultsStore(out).finished()) == 4 and len(rows_of(out)) == 6
    from vtok.sweep.report import load_rows

    assert sorted(r["cell"]["method"] for r in load_rows(out)) == ["divprune"] * 2 + ["random"] * 2


def test_a_task_that_raises_midway_fails_only_the_unfinished_cells(tmp_path):
    cfg = load_config({**GRID, "methods": ["random", "divprune", "uniform"], "keeps": [0.5], "seeds": [0],
                       "shard_size": 3})
    Probe.fail = {"divprune"}
    summary = run_sweep(cfg, str(tmp_path / "r.jsonl"), show_progress=False)
    assert summary.ran == 3 and len(summary.failed) == 2 and not summary.errors
    assert summary.failure_reasons() == {"RuntimeError: probe: divprune was told to fail": 2}
    assert {r["cell"]["method"]: "failed" in r for r in summary.rows} == {"random": False, "divprune": True,
                                                                           "uniform": True}


def test_second_sweep_on_the_same_file_is_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = load_config({**GRID, "methods": ["random"], "keeps": [0.5], "seeds": [0]})
    with ResultsStore(out):  # another sweep holds the file
        with pytest.raises(ValueError, match=r"is in use by another sweep"):
            run_sweep(cfg, str(out), show_progress=False)
        res = CliRunner().invoke(app, ["sweep", "--task", "probe", "--model", "m", "--methods", "random", "--keep",
                                       "0.5", "--results", str(out)])
        assert res.exit_code == 2 and "in use by another sweep" in res.output and res.output.count("\n") == 1
    assert _lines(out) == 0
    assert run_sweep(cfg, str(out), show_progress=False).ran == 1  # released: it runs


def test_lock_holds_across_processes(zygote, tmp_path):
    """A sweep in another process holds the lock for its whole run; this one is refused, not interleaved."""
    out = tmp_path / "r.jsonl"
    pid = zygote.run(str(out), "local")
    try:
        deadline = time.time() + 60
        while _lines(out) < 1 and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(ValueError, match=r"in use by another sweep"):
            run_sweep(load_config(GRID), str(out), show_progress=False)
    finally:
        os.kill(pid, signal.SIGKILL)
        zygote.wait(pid)


def _never_runs(self, cells, progress):
    raise AssertionError("a cell ran")


@pytest.mark.parametrize("case", ["folder", "immutable", "parent_is_file"])
def test_unwritable_results_refused_before_any_cell(case, tmp_path, monkeypatch):
    monkeypatch.setattr(Probe, "run", _never_runs)
    out = tmp_path / "r.jsonl"
    if case == "folder":
        out.mkdir()
        match = "is a folder"
    elif case == "parent_is_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "r.jsonl"
        match = "cannot write"
    else:
        out.write_text("")
        if os.geteuid() == 0:  # root writes through permission bits: make it immutable (chattr +i)
            subprocess.run(["chattr", "+i", str(out)], check=True)
        else:
            out.chmod(0o444)
        match = "cannot write"
    try:
        cfg = load_config({**GRID, "methods": ["random"], "keeps": [0.5], "seeds": [0]})
        with pytest.raises(ValueError, match=f"results: .*{match}"):
            run_sweep(cfg, str(out), show_progress=False)
        res = CliRunner().invoke(app, ["sweep", "--task", "probe", "--model", "m", "--methods", "random", "--keep",
                                       "0.5", "--results", str(out), "--no-progress"])
        assert res.exit_code == 2 and match in res.output and str(out) in res.output, res.output
        assert res.output.count("\n") == 1 and "Traceback" not in res.output
    finally:
        if case == "immutable" and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(out)], check=True)
