"""``vtok report RESULTS.jsonl``: a CSV, a markdown table and PNG plots from a sweep's rows.

One table row per cell (task, model, method, placement, keep, kept tokens, then every metric and timing value;
``n/a`` with the reason for a cell that could not run). Failed cells (``"failed"`` rows: they raised, and the next
run of the sweep redoes them) are left out and counted. Plots, one panel per (task, model, placement):

* ``<task>_<metric>.png``: the task's main metric against kept tokens, one line per method, baselines dashed;
* ``speed.png``: speed-up (1 / time ratio) against kept tokens, from the timing tasks;
* ``frontier.png``: accuracy against speed-up per (model, placement) where a grid has both, with the
  accuracy-vs-speed Pareto frontier drawn through the best points.

Rows are never averaged across settings: every setting that decides a row's numbers besides method, keep and
placement (``settings``: the task's options, the method's options, the model's fingerprint, the seed, the vtok
version) and differs between rows of one panel splits them into separate series, labelled with the differing
values (e.g. ``divprune [limit=200]``), and the table gets a column for each such key.
"""

from __future__ import annotations

import csv
import json
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


def load_rows(path: str | Path, failed: bool = False) -> list[dict[str, Any]]:
    """The rows of a results file (the last row of a cell wins if it appears twice); cells whose last row failed
    are left out unless ``failed``."""
    rows = {r["id"]: r for r in ResultsStore(path).rows()}
    return [r for r in rows.values() if failed or "failed" not in r]


def settings(row: dict[str, Any]) -> dict[str, str]:
    """What decides a row's numbers besides task, model name, method, keep and placement: ``seed``, ``vtok``
    (version), ``fingerprint`` (the model's weights), the task's options (by name) and ``options.<name>`` (the
    method's); values as JSON text."""
    c = row["cell"]
    out = {"seed": str(c["seed"]), "vtok": str(row.get("versions", {}).get("vtok", "?")),
           "fingerprint": str(c.get("fingerprint", ""))}
    out.update({k: json.dumps(v, sort_keys=True) for k, v in c.get("task_options", {}).items()})
    out.update({f"options.{k}": json.dumps(v, sort_keys=True) for k, v in c.get("options", {}).items()})
    return out


def varying(rows: list[dict[str, Any]]) -> list[str]:
    """The ``settings`` keys whose values differ between ``rows`` (a key some rows lack counts as differing)."""
    every = [settings(r) for r in rows]
    keys = sorted(set().union(*every)) if every else []
    return [k for k in keys if len({s.get(k) for s in every}) > 1]


def suffix(row: dict[str, Any], keys: list[str]) -> str:
    """`` [limit=200, seed=1]``: the row's values of ``keys`` (empty when no key differs)."""
    s = settings(row)
    return " [" + ", ".join(f"{k}={s.get(k, 'absent')}" for k in keys) + "]" if keys else ""


def _task_varying(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Task -> the settings that differ between its rows."""
    by: dict[str, list] = defaultdict(list)
    for r in rows:
        by[r["cell"]["task"]].append(r)
    return {t: varying(rs) for t, rs in by.items()}


def flatten(row: dict[str, Any], keys: list[str] = ()) -> dict[str, Any]:
    """One table row: the cell's fields, the values of the differing settings ``keys``, its metrics and timing
    values, and ``error`` (``failed: …`` for a failed cell)."""
    c = row["cell"]
    out = {"task": c["task"], "model": Path(c["model"]).name, "method": c["method"], "placement": c["placement"],
           "keep": c["keep"], "seed": c["seed"], "kept_tokens": row["metrics"].get("kept_tokens", "")}
    s = settings(row)
    out.update({k: s.get(k, "absent") for k in keys if k != "seed"})
    out.update({k: v for k, v in row["metrics"].items() if k != "kept_tokens"})
    out.update({k: v for k, v in row.get("timing", {}).items() if k != "shard_seconds"})
    out["error"] = f"failed: {row['failed']}" if "failed" in row else row.get("error", "")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and flattened rows, sorted by task, model, placement, method, keep (descending), seed and the
    settings that differ; a column per differing setting after the cell's own."""
    per_task = _task_varying(rows)
    keys = sorted({k for ks in per_task.values() for k in ks} - {"seed"})
    flat = [flatten(r, keys) for r in rows]
    flat.sort(key=lambda f: (f["task"], f["model"], f["placement"], f["method"], -float(f["keep"]), f["seed"],
                             *(str(f.get(k, "")) for k in keys)))
    cols = list(BASE_COLS) + keys
    for f in flat:
        cols += [k for k in f if k not in cols and k != "error"]
    return cols + ["error"], flat


def markdown(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows`` (every value as in the JSONL, floats to 4 decimals)."""
    cols, flat = table_rows(rows)
    own = set(BASE_COLS) | {k for ks in _task_varying(rows).values() for k in ks} | {"error"}  # never "n/a"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for f in flat:
        lines.append("| " + " | ".join(_fmt(f.get(c, "")) if not f["error"] or c in own else "n/a"
                                       for c in cols) + " |")
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


Series = tuple[str, str]  # (method, settings suffix)


def _panel_rows(rows, task: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(model, placement) -> the task's rows there that have metrics."""
    out: dict = defaultdict(list)
    for r in rows:
        c = r["cell"]
        if c["task"] == task and "error" not in r and "failed" not in r:
            out[(Path(c["model"]).name, c["placement"])].append(r)
    return out


def _panels(rows, task: str, metric: str) -> dict[tuple[str, str], dict[Series, list[tuple[float, float]]]]:
    """(model, placement) -> (method, settings suffix) -> sorted [(kept tokens, metric)]. Rows that differ in any
    setting are separate series; only rows equal in every setting meet at one point (the same cell twice)."""
    out = {}
    for panel, prs in _panel_rows(rows, task).items():
        keys = varying(prs)
        acc: dict = defaultdict(lambda: defaultdict(list))
        for r in prs:
            val = {**r["metrics"], **r.get("timing", {})}.get(metric)
            if val is not None:
                acc[(r["cell"]["method"], suffix(r, keys))][r["metrics"]["kept_tokens"]].append(val)
        if acc:
            out[panel] = {m: sorted((k, sum(v) / len(v)) for k, v in d.items()) for m, d in acc.items()}
    return out


def _refs(rows, task: str, metric: str) -> dict[tuple[str, str], dict[str, float]]:
    """(model, placement) -> settings suffix -> the unpruned model's value (``ref_<metric>``), when rows carry it."""
    out: dict = defaultdict(dict)
    for panel, prs in _panel_rows(rows, task).items():
        keys = [k for k in varying(prs) if not k.startswith("options.")]  # method options do not touch keep = 1.0
        for r in prs:
            ref = r["metrics"].get(f"ref_{metric}")
            if ref is not None:
                out[panel][suffix(r, keys)] = ref
    return out


def _curve_plot(panels, ylabel: str, title: str, out: Path, refs: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels, key=_panel_order)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        baselines = sorted({m for m, _ in panels[key] if _is_baseline(m)})
        for j, ((method, tail), pts) in enumerate(sorted(panels[key].items())):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=3, label=method + tail,
                    **_style(method, j, baselines))
        for j, (tail, ref) in enumerate(sorted((refs or {}).get(key, {}).items())):
            ax.axhline(ref, color="grey", ls=(":", "--", "-.")[j % 3], lw=0.8, label="keep = 1.0" + tail)
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

    ok = [r for r in rows if "error" not in r and "failed" not in r]
    shared = ("seed", "vtok", "fingerprint")  # settings a speed row and an accuracy row must agree on
    vary = _task_varying(ok)

    def join_key(r: dict[str, Any]) -> tuple:
        c, s = r["cell"], settings(r)
        return (Path(c["model"]).name, c["placement"], c["method"], c["keep"], *(s[k] for k in shared))

    speed: dict = defaultdict(list)
    for r in ok:
        if r["cell"]["task"] in SPEED_TASKS.values():
            speed[join_key(r)].append((r["timing"]["speedup"], suffix(r, vary[r["cell"]["task"]])))
    pts: dict = defaultdict(list)
    for r in ok:
        c = r["cell"]
        if c["task"] not in SPEED_TASKS:
            continue
        metric, tail = MAIN_METRIC[c["task"]], suffix(r, vary[c["task"]])
        for sp, tail_t in speed.get(join_key(r), []):
            pts[(c["task"], Path(c["model"]).name, c["placement"])].append((sp, r["metrics"][metric],
                                                                           c["method"] + tail + tail_t))
    if not pts:
        return False
    keys = sorted(pts, key=lambda k: (k[0], *_panel_order(k[1:])))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        methods = sorted({p[2] for p in pts[key]})
        baselines = [m for m in methods if _is_baseline(m.split(" [")[0])]
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

    Returns ``{"markdown": str, "files": [paths], "rows": n, "failed": cells left out because they failed}``.
    Raises ``ValueError`` naming the file or folder when there is nothing to report or ``out`` is not a folder."""
    every = load_rows(results, failed=True)
    rows = [r for r in every if "failed" not in r]
    if not rows:
        raise ValueError(f"results: {results} holds no finished cells")
    out = Path(out) if out is not None else Path(results).with_suffix("")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder (the report writes several files into a folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
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
            _curve_plot(panels, "speed-up vs keep = 1.0 (1 / time ratio)", "speed", path,
                        refs={p: {"": 1.0} for p in panels})
        else:
            path = out / f"{task}_{metric}.png"
            _curve_plot(panels, metric, task, path, refs=_refs(rows, task, metric))
        files.append(path)
    if _frontier_plot(rows, out / "frontier.png"):
        files.append(out / "frontier.png")
    return {"markdown": md, "files": files, "rows": len(rows), "failed": len(every) - len(rows)}
