import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_strategies_benchmark_quick_prints_a_table():
    # the interpreter running the tests is the project's venv python
    res = subprocess.run([sys.executable, "-m", "benchmarks.strategies", "--quick", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert any(line.startswith("command: `python -m benchmarks.strategies --quick") for line in lines)
    header = "| method | family | N | time / random | time / ViT-B block |"
    assert any(line.startswith(header) for line in lines), res.stdout
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(header)]
    names = {r.split("|")[1].strip() for r in rows}
    assert {"random", "uniform", "pool2d", "transprune", "(ViT-B/16 block)"} <= names
    random_row = next(r for r in rows if r.split("|")[1].strip() == "random")
    assert random_row.split("|")[3].strip() == "64" and float(random_row.split("|")[4]) == 1.0


def test_kernels_benchmark_quick_runs_on_cpu():
    res = subprocess.run([sys.executable, "-m", "benchmarks.kernel_ops", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ops = {ln.split("|")[1].strip() for ln in res.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert {"attention_received", "cosine_argmax", "farthest_point", "topk_gather", "kmeans_assign",
            "segment_stats"} <= ops


def test_strategy_shares_quick_prints_every_component():
    res = subprocess.run([sys.executable, "-m", "benchmarks.strategy_shares", "--n", "64", "--reps", "1",
                          "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    row = json.loads(res.stdout.splitlines()[-1])
    assert row["n"] == 64 and {"vit_b_block", "kmeans_iters1", "cdpruner", "vispruner_important_only"} <= set(row["ms"])
    assert all(v > 0 for v in row["ms"].values())
