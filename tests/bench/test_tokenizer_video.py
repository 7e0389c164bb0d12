"""``benchmarks/tokenizer_video.py``: ordered image tokens per frame, fixed vs adaptive lengths, copy and merge."""

import itertools
import math

import pytest
import torch

from tests.helpers.script_loader import load_benchmark
from vtok.video.synthetic import write_video


def test_segment_dp_matches_brute_force():
    bench = load_benchmark("tokenizer_video")
    g = torch.Generator().manual_seed(0)
    t_n, k_n = 4, 3
    d = torch.rand(t_n, k_n, t_n, generator=g, dtype=torch.float64)
    best, start, length = bench.segment_dp(d, t_n * k_n)
    for total in range(1, t_n * k_n + 1):
        brute = math.inf
        for plan in itertools.product(range(k_n + 1), repeat=t_n):  # tokens per frame, 0 = copy
            if plan[0] == 0 or sum(plan) != total:
                continue
            cost, src = 0.0, None
            for t, n in enumerate(plan):
                src = (t, n) if n else src
                cost += float(d[src[0], src[1] - 1, t])
            brute = min(brute, cost)
        assert float(best[total]) == pytest.approx(brute)
        plan = bench.segment_plan(start, length, total)
        assert int(plan.sum()) == total and int(plan[0]) >= 1
    assert math.isinf(float(best[0]))


def test_knapsack_matches_brute_force():
    bench = load_benchmark("tokenizer_video")
    g = torch.Generator().manual_seed(1)
    err = torch.rand(3, 4, generator=g, dtype=torch.float64)
    cost = torch.tensor([[1, 1, 2, 3], [0, 1, 1, 2], [1, 2, 3, 4]])
    best, choice = bench.knapsack(err, cost, 9)
    for total in range(10):
        opts = [p for p in itertools.product(range(4), repeat=3)
                if sum(int(cost[t, o]) for t, o in enumerate(p)) == total]
        want = min((sum(float(err[t, o]) for t, o in enumerate(p)) for p in opts), default=math.inf)
        assert float(best[total]) == pytest.approx(want)
        if opts:
            plan = bench.knapsack_plan(choice, cost, total)
            assert sum(int(cost[t, o]) for t, o in enumerate(plan)) == total


def test_tokenizer_video_benchmark_tiny(tmp_path):
    bench = load_benchmark("tokenizer_video")
    clip = tmp_path / "clip.mp4"
    write_video(clip, 12, size=(48, 64), freeze_from=6)  # frames 6..11 repeat frame 5
    doc = bench.main(["--clips", str(clip), "--frames", "12", "--ks", "4", "8", "--merge-keep", "1.0", "0.5",
                      "--out-dir", str(tmp_path / "out"), "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "results.md").is_file()
    assert (tmp_path / "p.png").stat().st_size > 1000
    (c,) = doc["clips"]
    assert c["frames"] == 12 and len(c["frame_change"]) == 12
    rows = {(r["method"], r["k"]): r for r in c["rows"]}
    assert set(rows) == {(m, k) for m in bench.METHODS for k in (4, 8)}
    bpt = doc["bits_per_token"]
    for k in (4, 8):
        fixed = rows["prefix", k]
        assert fixed["tokens_per_frame"] == k and fixed["bits_per_s"] == pytest.approx(fixed["tokens_per_s"] * bpt)
        for m in ("adaptive", "adaptive+copy"):  # the same mean tokens as the fixed prefix, plus length overhead
            r = rows[m, k]
            assert r["tokens_per_frame"] == fixed["tokens_per_frame"] and sum(r["lengths"]) == 12 * k
            assert r["bits_per_s"] > fixed["bits_per_s"]
        assert min(rows["adaptive", k]["lengths"]) >= 1
        merged = rows["merge+adaptive", k]
        assert merged["tokens_per_frame"] <= k and merged["merge_keep"] in (1.0, 0.5)
        copy = rows["adaptive+copy", k]
        assert copy["lengths"][0] >= 1 and copy["zero_token_frames"] >= 1
        # the frozen stretch (frames 6..11 repeat frame 5) costs fewer tokens than the moving part
        assert sum(copy["lengths"][6:]) < sum(copy["lengths"][:6])
        assert copy["dp_error"] <= rows["adaptive", k]["mse"] + 1e-9  # length 0 only widens the choice
        assert copy["mse"] == pytest.approx(copy["dp_error"], rel=1e-4)  # the receiver shows what the DP planned
        for r in (fixed, rows["adaptive", k], copy, merged):
            assert 5 < r["psnr"] <= 100
