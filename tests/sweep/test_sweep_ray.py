"""``--backend ray``: the same rows (timing aside) as the local backend, written by the driver only."""

from __future__ import annotations

import builtins
import sys

import pytest

from tests.helpers.sweep_helpers import comparable, vit_checkpoint
from vtok.sweep import load_config, run_sweep

ray = pytest.importorskip("ray", reason="ray is not installed (it is in the dev extra: pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (two CPUs, no dashboard)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_rows_equal_local_rows(local_ray, tmp_path):
    ckpt = str(vit_checkpoint(tmp_path))
    cfg = load_config({"tasks": ["eval_vit"], "models": [ckpt], "methods": ["random", "divprune", "pool2d"],
                       "keeps": [0.75, 0.25], "placements": ["inside", "after"], "shard_size": 3,
                       "task_options": {"eval_vit": {"limit": 6, "batch": 4}}})
    local = run_sweep(cfg, str(tmp_path / "local.jsonl"), show_progress=False)
    remote = run_sweep(cfg, str(tmp_path / "ray.jsonl"), backend="ray", show_progress=False)
    assert remote.ran == local.ran == 12 and len(remote.errors) == 2  # pool2d cannot make 147 tokens
    assert comparable(remote.rows) == comparable(local.rows)
    lines = (tmp_path / "ray.jsonl").read_text().splitlines()
    assert len(lines) == 12
    hosts = {r["host"] for r in remote.rows}
    assert hosts and all(hosts)
    again = run_sweep(cfg, str(tmp_path / "ray.jsonl"), backend="ray", show_progress=False)
    assert again.ran == 0 and again.skipped == 12


def test_without_ray_the_flag_says_how_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("no ray here")
        return real_import(name, *a, **k)

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    cfg = load_config({"tasks": ["eval_vit"], "models": [str(vit_checkpoint(tmp_path))], "methods": ["random"],
                       "keeps": [0.5]})
    with pytest.raises(RuntimeError, match=r"pip install 'vtok\[ray\]'"):
        run_sweep(cfg, str(tmp_path / "r.jsonl"), backend="ray", show_progress=False)
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(ValueError, match=r"backend: 'dask' is not one of"):
        run_sweep(cfg, str(tmp_path / "r.jsonl"), backend="dask", show_progress=False)


def test_ray_eval_vit_rows_arrive_cell_by_cell(local_ray, tmp_path):
    """On a Ray worker too, an eval_vit shard's first cell is written before a later cell of the shard raises
    (before: the whole shard failed together)."""
    from tests.helpers import sweep_helpers

    ray.cloudpickle.register_pickle_by_value(sweep_helpers)
    task = sweep_helpers.failing_eval_vit()
    task.fail = frozenset({"divprune"})
    try:
        cfg = load_config({"tasks": ["eval_vit_failing"], "models": [str(vit_checkpoint(tmp_path))],
                           "methods": ["random", "divprune", "uniform"], "keeps": [0.25], "placements": ["inside"],
                           "shard_size": 3, "task_options": {"eval_vit_failing": {"limit": 6, "batch": 4}}})
        summary = run_sweep(cfg, str(tmp_path / "r.jsonl"), backend="ray", show_progress=False)
    finally:
        task.fail = frozenset()
    rows = {r["cell"]["method"]: r for r in summary.rows}
    assert "failed" not in rows["random"] and rows["random"]["metrics"]["n"] == 6
    assert rows["divprune"]["failed"] == "RuntimeError: told to fail: divprune" and "failed" in rows["uniform"]
