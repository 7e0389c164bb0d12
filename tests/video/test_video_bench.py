import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_video_benchmark_quick_prints_both_tables():
    res = subprocess.run([sys.executable, "-m", "benchmarks.video", "--quick", "--no-real"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "command: `python -m benchmarks.video --quick --no-real`"
    rows = [ln.split("|") for ln in lines if ln.startswith("| ") and "---" not in ln]
    strategies = {r[1].strip() for r in rows if len(r) == 7}
    assert {"frame_merge", "segment_cluster", "query_budget", "temporal_pool", "per_frame"} <= strategies
    for r in rows:
        if len(r) == 7 and r[1].strip() != "strategy":
            assert r[3].strip() == "32" and float(r[5]) > 0  # 8 frames x 16 tokens at keep 0.25; a ratio
    decode = [r for r in rows if len(r) == 11 and r[1].strip() != "video"]
    assert [r[4].strip() for r in decode] == ["decord", "pyav"]
    assert all(float(r[5]) > 0 and float(r[7]) >= 0 for r in decode)
