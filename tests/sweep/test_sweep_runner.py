"""vtok.sweep.runner on the eval-ViT tasks: resume after SIGKILL equals an uninterrupted run, one line per cell,
the benchmark's counts reproduced, timing ratios, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import ROOT
from tests.helpers.script_loader import load_benchmark
from tests.helpers.sweep_helpers import comparable, failing_eval_vit, vit_checkpoint
from vtok.cli import app
from vtok.sweep import ResultsStore, load_config, run_sweep

METHODS, KEEPS = ["random", "cls_attn", "pool2d"], [0.75, 0.25]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(vit_checkpoint(tmp_path_factory.mktemp("vit")))


def config(ckpt: str, **kw):
    cfg = {"name": "t", "tasks": ["eval_vit"], "models": [ckpt], "methods": METHODS, "keeps": KEEPS,
           "task_options": {"eval_vit": {"limit": 10, "batch": 4}}}
    cfg.update(kw)
    return load_config(cfg)


@pytest.fixture(scope="module")
def straight(ckpt, tmp_path_factory):
    """One uninterrupted run of the grid."""
    path = tmp_path_factory.mktemp("straight") / "r.jsonl"
    summary = run_sweep(config(ckpt), str(path), show_progress=False)
    return path, summary


def test_rows_metrics_and_rerun_skips_everything(ckpt, straight):
    path, summary = straight
    assert summary.total == summary.ran == 12 and summary.skipped == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 12 and len({json.loads(ln)["id"] for ln in lines}) == 12
    by = {(r["cell"]["method"], r["cell"]["placement"], r["cell"]["keep"]): r for r in summary.rows}
    assert "pool2d cannot make exactly k=147" in by["pool2d", "inside", 0.75]["error"]  # n/a, like the benchmark
    ok = [r for r in summary.rows if "error" not in r]
    for r in ok:
        m = r["metrics"]
        assert m["n"] == 10 and m["accuracy"] == m["correct"] / 10 and m["agreement"] == m["agree"] / 10
        assert m["kept_tokens"] == {0.75: 147, 0.25: 49}[r["cell"]["keep"]] and m["tokens"] == 196
        assert r["versions"]["torch"] and r["seed"] == 0
    again = run_sweep(config(ckpt), str(path), show_progress=False)
    assert again.ran == 0 and again.skipped == 12 and path.read_text().splitlines() == lines


def test_keep_one_is_the_unpruned_model(ckpt, tmp_path):
    rows = run_sweep(config(ckpt, methods=["divprune", "random"], keeps=[1.0]), str(tmp_path / "r.jsonl"),
                     show_progress=False).rows
    assert len(rows) == 4
    for r in rows:
        assert r["metrics"]["agreement"] == 1.0 and r["metrics"]["accuracy"] == r["metrics"]["ref_accuracy"]


def test_same_counts_as_the_encoder_accuracy_benchmark(ckpt, straight, tmp_path):
    """The sweep's cells count what benchmarks/encoder_accuracy.py counts on the same images and batches."""
    bench = load_benchmark("encoder_accuracy")
    state = bench.main(["--checkpoint", ckpt, "--methods", *METHODS, "--keeps", *map(str, KEEPS), "--test-limit",
                        "10", "--batch", "4", "--speed-batch", "2", "--rounds", "1", "--out", str(tmp_path / "b")])
    rows = straight[1].rows
    for r in rows:
        c = r["cell"]
        key = f"{c['method']}|{c['placement']}|{c['keep']}"
        if "error" in r:
            assert key in state["errors"]
        else:
            assert r["metrics"]["correct"] == state["correct"][key], key
            assert r["metrics"]["ref_accuracy"] == state["correct"]["none"] / 10
    assert len(rows) == len(state["correct"]) - 1 + len(state["errors"])


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(ckpt, straight, tmp_path):
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(f"name: t\ntasks: [eval_vit]\nmodels: ['{ckpt}']\nmethods: {METHODS}\nkeeps: {KEEPS}\n"
                   f"task_options: {{eval_vit: {{limit: 10, batch: 4}}}}\nshard_size: 1\n")
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "vtok.cli", "sweep", str(cfg), "--results", str(out), "--no-progress", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _lines(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _lines(out)
    assert 2 <= killed_at < 12, f"the kill came at {killed_at} of 12 cells"
    with open(out, "ab") as f:  # as if the kill had torn a line mid-write
        f.write(b'{"id": "0123", "cell": {"ta')
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{killed_at} already in" in res.stdout
    lines = out.read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]  # every line parses
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    assert comparable(rows) == comparable(straight[1].rows)


def test_each_eval_vit_cell_is_written_as_it_finishes(ckpt, straight, tmp_path):
    """One shard of three cells whose second raises: the first cell's row is already on disk, finished, and equal
    to the uninterrupted run's (before: the shard's cells advanced batch by batch together, so the raise failed all
    three)."""
    task = failing_eval_vit()
    task.fail = frozenset({"cls_attn"})
    cfg = config(ckpt, tasks=["eval_vit_failing"], methods=["random", "cls_attn", "pool2d"], keeps=[0.25],
                 placements=["inside"], shard_size=3, task_options={"eval_vit_failing": {"limit": 10, "batch": 4}})
    out = tmp_path / "r.jsonl"
    seen: list[tuple[str, int]] = []
    summary = run_sweep(cfg, str(out), show_progress=False,
                        on_row=lambda row: seen.append((row["cell"]["method"], _lines(out))))
    assert seen[0] == ("random", 1)  # on disk when the driver hands it on, before the failing cell ran
    rows = {r["cell"]["method"]: r for r in ResultsStore(out).rows()}
    assert "failed" not in rows["random"] and rows["cls_attn"]["failed"] == "RuntimeError: told to fail: cls_attn"
    assert len(summary.failed) == 2  # cls_attn, and pool2d: the shard's cells not yet finished
    ref = {r["cell"]["method"]: r for r in straight[1].rows if r["cell"]["placement"] == "inside"
           and r["cell"]["keep"] == 0.25}
    assert rows["random"]["metrics"] == ref["random"]["metrics"]
    task.fail = frozenset()
    again = run_sweep(cfg, str(out), show_progress=False)  # the next run redoes only the unfinished cells
    assert again.skipped == 1 and again.ran == 2 and not again.failed


@pytest.mark.parametrize("budget_gb", ["0", "0.001", "0.003"])
def test_cache_budget_changes_when_rows_arrive_never_the_numbers(ckpt, straight, tmp_path, monkeypatch, budget_gb):
    """No cache (the shard's cells run batch by batch together), room for one batch's state, room for all: the same
    rows, bit for bit, as the default run (and so as the benchmark's one-pass counts)."""
    monkeypatch.setenv("VTOK_SWEEP_CACHE_GB", budget_gb)
    rows = run_sweep(config(ckpt, placements=["inside", "after"], shard_size=12), str(tmp_path / "r.jsonl"),
                     show_progress=False).rows
    assert comparable(rows) == comparable(straight[1].rows)


def test_bad_cache_budget_is_refused_before_any_cell(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("VTOK_SWEEP_CACHE_GB", "lots")
    with pytest.raises(ValueError, match=r"VTOK_SWEEP_CACHE_GB: expected a number of GiB >= 0 .*'lots'"):
        config(ckpt)


def test_cli_command_line_grid_and_report(ckpt, tmp_path):
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, ["sweep", "--task", "eval_vit,timing", "--model", ckpt, "--methods",
                                   "uniform,divprune", "--keep", "0.5,0.25", "--placement", "inside",
                                   "--task-option", "eval_vit.limit=6", "--task-option", "timing.batch=2",
                                   "--task-option", "timing.rounds=1", "--results", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "8 cells: 0 already in" in res.output and "8 run now" in res.output
    rows = ResultsStore(out).rows()
    timing = [r for r in rows if r["cell"]["task"] == "timing"]
    assert len(rows) == 8 and len(timing) == 4
    for r in timing:  # fewer tokens after the middle block: fewer FLOPs, about in proportion
        kept = r["metrics"]["kept_tokens"] / 196
        assert kept < r["metrics"]["flops_ratio"] < 1.0
        assert r["timing"]["time_ratio"] > 0 and r["timing"]["speedup"] == pytest.approx(1 / r["timing"]["time_ratio"])
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"results.csv", "results.md", "eval_vit_accuracy.png", "speed.png", "frontier.png"} <= files
