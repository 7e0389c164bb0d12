"""``vtok report RESULTS.jsonl``: a CSV, a markdown table and PNG plots from a sweep's rows.

One table row per cell (task, model, method, placement, keep, kept tokens, then every metric and timing value;
``n/a`` with the reason for a cell that could not run). Plots, one panel per (task, model, placement):

* ``<task>_<metric>.png``: the task's main metric against kept tokens, one line per method, baselines dashed;
* ``speed.png``: speed-up (1 / time ratio) against kept tokens, from the timing tasks;
* ``frontier.png``: accuracy against speed-up per (model, placement) where a grid has both, with the
  accuracy-vs-speed Pareto frontier drawn through the best points.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from vtok.sweep.store import ResultsStore

# the metric of each task the frontier uses, and every metric drawn against kept tokens
MAIN_METRIC = {"eval_vit": "accuracy", "hf_vlm": "token_agreement", "timing": "speedup", "hf_vlm_timing": "speedup"}
PLOTTED = {"eval_vit": ("accuracy", "agreement"), "hf_vlm": ("token_agreement", "logit_kl"), "timing": ("speedup",),
           "hf_vlm_timing": ("speedup",)}
BASELINE_STYLES = [("black", "--"), ("dimgray", "-."), ("black", ":"), ("gray", (0, (6, 2, 1, 2)))]
SPEED_TASKS = {"eval_vit": "timing", "hf_vlm": "hf_vlm_timing"}
BASE_COLS = ("task", "model", "method", "placement", "keep", "seed", "kept_tokens")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results file (the last row of a cell wins if it appears twice)."""
    rows = {r["id"]: r for r in ResultsStore(path).rows()}
    return list(rows.values())


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """One table row: the cell's fields, its metrics and timing values, and ``error``."""
    c = row["cell"]
    out = {"task": c["task"], "model": Path(c["model"]).name, "method": c["method"], "placement": c["placement"],
           "keep": c["keep"], "seed": c["seed"], "kept_tokens": row["metrics"].get("kept_tokens", "")}
    out.update({k: v for k, v in row["metrics"].items() if k != "kept_tokens"})
    out.update({k: v for k, v in row.get("timing", {}).items() if k != "shard_seconds"})
    out["error"] = row.get("error", "")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and flattened rows, sorted by task, model, placement, method, keep (descending), seed."""
    flat = [flatten(r) for r in rows]
    flat.sort(key=lambda f: (f["task"], f["model"], f["placement"], f["method"], -float(f["keep"]), f["seed"]))
    cols = list(BASE_COLS)
    for f in flat:
        cols += [k for k in f if k not in cols and k != "error"]
    return cols + ["error"], flat


def markdown(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows`` (every value as in the JSONL, floats to 4 decimals)."""
    cols, flat = table_rows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for f in flat:
        lines.append("| " + " | ".join(_fmt(f.get(c, "")) if not f["error"] or c in BASE_COLS or c == "error"
                                       else "n/a" for c in cols) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols, flat = table_rows(rows)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for f in flat:
            w.writerow({c: f.get(c, "") for c in cols})


def _is_baseline(method: str) -> bool:
    import vtok

    return vtok.get_method(method).family == "baseline"


def _style(method: str, j: int, baselines: list[str]) -> dict[str, Any]:
    """Line style: baselines dashed in greys (each its own dash), the rest solid in colours."""
    import matplotlib.pyplot as plt

    if method in baselines:
        color, ls = BASELINE_STYLES[baselines.index(method) % len(BASELINE_STYLES)]
        return {"color": color, "ls": ls, "lw": 1.8, "marker": "s"}
    return {"color": plt.get_cmap("tab10")(j % 10), "ls": "-", "lw": 1.4, "marker": "o"}


def _panel_order(key: tuple[str, str]) -> tuple:
    """Panels by model, then placement in pipeline order (inside, after, pre_llm, llm:K)."""
    model, placement = key
    rank = {"inside": 0, "after": 1, "pre_llm": 2}.get(placement, 3)
    return model, rank, placement


def _panels(rows, task: str, metric: str) -> dict[tuple[str, str], dict[str, list[tuple[float, float]]]]:
    """(model, placement) -> method -> sorted [(kept tokens, metric)] (seeds averaged)."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        c, val = r["cell"], {**r["metrics"], **r.get("timing", {})}.get(metric)
        if c["task"] != task or val is None or "error" in r:
            continue
        acc[(Path(c["model"]).name, c["placement"])][c["method"]][r["metrics"]["kept_tokens"]].append(val)
    return {p: {m: sorted((k, sum(v) / len(v)) for k, v in d.items()) for m, d in ms.items()}
            for p, ms in acc.items()}


def _curve_plot(panels, ylabel: str, title: str, out: Path, ref: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels, key=_panel_order)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        baselines = sorted(m for m in panels[key] if _is_baseline(m))
        for j, (method, pts) in enumerate(sorted(panels[key].items())):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=3, label=method, **_style(method, j, baselines))
        if ref is not None:
            ax.axhline(ref, color="grey", ls=":", lw=0.8, label="keep = 1.0")
        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in panels[key].values() for p in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("visual tokens kept")
        ax.set_title(f"{title}: {key[0]}, {key[1]}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _frontier_plot(rows, out: Path) -> bool:
    """Accuracy (main metric) vs speed-up per (model, placement), Pareto frontier through the best points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed: dict = {}
    for r in rows:
        c = r["cell"]
        if c["task"] in SPEED_TASKS.values() and "error" not in r:
            speed[(Path(c["model"]).name, c["placement"], c["method"], c["keep"])] = r["timing"]["speedup"]
    pts: dict = defaultdict(list)
    for r in rows:
        c = r["cell"]
        metric = MAIN_METRIC.get(c["task"])
        key = (Path(c["model"]).name, c["placement"], c["method"], c["keep"])
        if c["task"] in SPEED_TASKS and "error" not in r and key in speed:
            pts[(c["task"], key[0], key[1])].append((speed[key], r["metrics"][metric], c["method"]))
    if not pts:
        return False
    keys = sorted(pts, key=lambda k: (k[0], *_panel_order(k[1:])))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        methods = sorted({p[2] for p in pts[key]})
        baselines = [m for m in methods if _is_baseline(m)]
        for j, m in enumerate(methods):
            mp = [p for p in pts[key] if p[2] == m]
            st = _style(m, j, baselines)
            ax.scatter([p[0] for p in mp], [p[1] for p in mp], s=18, label=m, color=st["color"], marker=st["marker"])
        front, best = [], -math.inf
        for p in sorted(pts[key], key=lambda p: (-p[0], -p[1])):  # fastest first: keep points more accurate
            if p[1] > best:
                front.append(p)
                best = p[1]
        ax.plot([p[0] for p in front], [p[1] for p in front], color="grey", lw=1, ls="-", zorder=0,
                label="frontier")
        ax.set_xlabel("speed-up vs keep = 1.0")
        ax.set_ylabel(MAIN_METRIC[key[0]])
        ax.set_title(f"{key[0]}: {key[1]}, {key[2]}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_report(results: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md`` and the PNGs into ``out`` (default: beside the results file).

    Returns ``{"markdown": str, "files": [paths], "rows": n}``."""
    rows = load_rows(results)
    if not rows:
        raise ValueError(f"results: {results} holds no finished cells")
    out = Path(out) if out is not None else Path(results).with_suffix("")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.csv", out / "results.md"]
    write_csv(rows, files[0])
    md = markdown(rows)
    files[1].write_text(md + "\n")
    for task, metric in ((t, m) for t, ms in PLOTTED.items() for m in ms):
        panels = _panels(rows, task, metric)
        if not panels:
            continue
        if task in SPEED_TASKS.values():
            path = out / "speed.png" if task == "timing" else out / f"speed_{task}.png"
            _curve_plot(panels, "speed-up vs keep = 1.0 (1 / time ratio)", "speed", path, ref=1.0)
        else:
            refs = [r["metrics"].get("ref_accuracy") for r in rows if r["cell"]["task"] == task]
            ref = refs[0] if refs and refs[0] is not None and metric == "accuracy" else None
            path = out / f"{task}_{metric}.png"
            _curve_plot(panels, metric, task, path, ref=ref)
        files.append(path)
    if _frontier_plot(rows, out / "frontier.png"):
        files.append(out / "frontier.png")
    return {"markdown": md, "files": files, "rows": len(rows)}
