"""``benchmarks.gpu_all --dry-run``: every step of the GPU script runs on the CPU (tiny shapes, Triton interpreter)
and writes its tables, so the script is ready when a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_all_dry_run_writes_every_table(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_all", "--dry-run", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_all.json").read_text())
    assert [s["step"] for s in steps] == ["env", "cuda_tests", "kernels", "encoder", "prefill"]
    assert all(s["status"] == "ok" for s in steps), [(s["step"], s.get("error")) for s in steps]
    assert steps[1]["data"]["returncode"] == 0  # the CUDA-marked tests ran (on CPU) and passed
    md = (tmp_path / "gpu_all.md").read_text()
    for needle in ("| attention_received |", "| tome r=2 |", "| llava, 2 images | random | pre | 0.25 | 32 → 8 |",
                   "| qwen2_vl | fastv | 2 |"):
        assert needle in md, needle


def test_gpu_all_refuses_a_bad_budget(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_all", "--dry-run", "--out", str(tmp_path),
                          "--budget-s", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--budget-s must be > 0" in res.stderr
