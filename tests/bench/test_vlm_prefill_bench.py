import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_vlm_prefill_benchmark_quick_prints_tables():
    res = subprocess.run([sys.executable, "-m", "benchmarks.vlm_prefill", "--quick", "--rounds", "1",
                          "--new-tokens", "2", "--families", "llava,qwen2_vl,qwen3_vl"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| llava |")]
    methods = {r.split("|")[2].strip() for r in rows}
    assert {"(unpruned)", "random", "divprune", "visionzip", "fastv"} <= methods
    assert any("16 → 4" in r for r in rows)  # keep 0.25 of 16 tokens, exact budget
    qwen = {r.split("|")[2].strip() for r in res.stdout.splitlines() if r.startswith("| qwen2_vl |")}
    assert {"(unpruned)", "random", "divprune", "fastv"} <= qwen
    qwen3 = [r for r in res.stdout.splitlines() if r.startswith("| qwen3_vl |")]
    assert {"(unpruned)", "random", "divprune", "fastv"} <= {r.split("|")[2].strip() for r in qwen3}
    assert any("16 → 4" in r for r in qwen3)  # DeepStack features pruned with the image tokens: the model runs
