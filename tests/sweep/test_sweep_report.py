"""vtok report: the markdown table and CSV say what the JSONL says; the plots are written."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from vtok.cli import app
from vtok.sweep import ResultsStore, write_report
from vtok.sweep.report import markdown

METHODS = ("random", "uniform", "divprune", "tome")


def synthetic_rows() -> list[dict]:
    """Rows shaped like the runner's: eval_vit accuracy and timing speed for a few methods and budgets."""
    rows = []
    for j, method in enumerate(METHODS):
        for keep, kept in ((0.5, 98), (0.25, 49), (0.1, 20)):
            cell = {"task": "eval_vit", "model": "/x/eval_vit", "method": method, "keep": keep,
                    "placement": "inside", "seed": 0, "options": {}, "task_options": {}, "fingerprint": "f"}
            acc = 0.85 - (0.5 - keep) * 0.1 * (j + 1)
            rows.append({"id": f"a{j}{keep}", "cell": cell, "metrics": {"accuracy": acc, "agreement": acc + 0.1,
                                                                         "kept_tokens": kept}, "timing": {}})
            rows.append({"id": f"t{j}{keep}", "cell": {**cell, "task": "timing"},
                         "metrics": {"flops_ratio": kept / 196, "kept_tokens": kept},
                         "timing": {"time_ratio": kept / 196 + 0.1 * j, "speedup": 1 / (kept / 196 + 0.1 * j)}})
    rows.append({"id": "err", "cell": {**rows[0]["cell"], "method": "pool2d", "keep": 0.75},
                 "metrics": {}, "timing": {}, "error": "keep: pool2d cannot make exactly k=147 tokens"})
    return rows


def test_markdown_and_csv_match_the_jsonl_and_plots_are_written(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    rows = synthetic_rows()
    for r in rows:
        store.append(r)
    res = write_report(path)
    assert res["rows"] == len(rows)
    out = tmp_path / "r"
    for name in ("results.csv", "results.md", "eval_vit_accuracy.png", "eval_vit_agreement.png", "speed.png",
                 "frontier.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 or name.endswith((".csv", ".md")), name
        assert not name.endswith(".png") or data[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text().strip().splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    table = [dict(zip(cols, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in md[2:]]
    assert len(table) == len(rows)
    by = {(t["task"], t["method"], float(t["keep"])): t for t in table}
    for r in rows:
        c = r["cell"]
        t = by[c["task"], c["method"], c["keep"]]
        if "error" in r:
            assert t["error"] == r["error"] and t["accuracy"] == "n/a"
            continue
        for k, v in {**r["metrics"], **r["timing"]}.items():
            assert t[k] == (f"{v:.4f}" if isinstance(v, float) else str(v)), (k, t[k], v)
    with open(out / "results.csv") as fh:  # the CSV keeps full precision
        csv_rows = list(csv.DictReader(fh))
    acc = {(x["task"], x["method"], float(x["keep"])): x for x in csv_rows}
    for r in rows:
        if "accuracy" in r["metrics"]:
            c = r["cell"]
            assert float(acc[c["task"], c["method"], c["keep"]]["accuracy"]) == r["metrics"]["accuracy"]
    assert md == markdown(store.rows()).splitlines()


def test_report_cli(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows()))
    res = CliRunner().invoke(app, ["report", str(path), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "| eval_vit | eval_vit | divprune | inside |" in res.output and "frontier.png" in res.output
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    res = CliRunner().invoke(app, ["report", str(empty)])
    assert res.exit_code == 2 and "holds no finished cells" in res.output


def test_terminal_summary_is_one_narrow_table_per_task():
    from rich.console import Console

    from vtok.cli import _sweep_tables

    tables = _sweep_tables(synthetic_rows(), "t")
    assert [t.title.split(" — ")[1].split(",")[0] for t in tables] == ["task eval_vit", "task timing"]
    acc, timing = ([c.header for c in t.columns] for t in tables)
    assert acc[:2] == ["method", "keep"] and "accuracy" in acc and "speedup" not in acc and "model" not in acc
    assert "speedup" in timing and "accuracy" not in timing and "error" not in timing
    assert "error" in acc  # the pool2d n/a row says why
    assert len(tables[0].rows) == 13 and len(tables[1].rows) == 12
    out = Console(width=100, record=True)
    for t in tables:
        out.print(t)
    assert "model eval_vit" in out.export_text()
