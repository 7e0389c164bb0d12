"""Pruning sweeps: method × keep × placement × model × task grids, resumable JSONL results, reports.

    from vtok.sweep import load_config, run_sweep, write_report
    cfg = load_config("configs/sweeps/demo.yaml")          # or a dict; every key checked before any cell runs
    summary = run_sweep(cfg, "outputs/sweeps/demo.jsonl")  # re-run: finished cells are skipped
    write_report("outputs/sweeps/demo.jsonl")              # CSV, markdown table, PNG plots

Modules: ``config`` (the grid and its checks), ``tasks`` (the task registry; ``vit_task``, ``vlm_task`` the built-in
tasks, ``vit`` the ViT forwards they share with ``benchmarks/encoder_accuracy.py``), ``store`` (the JSONL),
``runner`` (local backend, progress), ``ray_backend``, ``report``, ``lmms_plugin`` (the lmms-eval model).
"""

from vtok.sweep.config import Cell, SweepConfig, load_config
from vtok.sweep.report import write_report
from vtok.sweep.runner import Summary, run_sweep
from vtok.sweep.store import ResultsStore
from vtok.sweep.tasks import TASKS, Task, get_task, register_task

__all__ = ["TASKS", "Cell", "ResultsStore", "Summary", "SweepConfig", "Task", "get_task", "load_config",
           "register_task", "run_sweep", "write_report"]
