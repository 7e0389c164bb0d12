"""benchmarks/tokenizer_prune.py at tiny settings on the committed checkpoints (fsq_nested; binary_nested stands in
for the control so the test needs no training run): output structure, equal mean token counts, byte accounting,
and the identities at k = K (every method keeps all K tokens, so it is the full reconstruction)."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers.script_loader import load_benchmark

ARGS = ["--nested", "fsq_nested", "--control", "binary_nested", "--ks", "4", "32", "--limit", "2",
        "--sources", "skimage", "--clf-train", "60", "--clf-eval", "20", "--batch", "8"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    bench = load_benchmark("tokenizer_prune")
    out = tmp_path_factory.mktemp("prune")
    res = bench.main(ARGS + ["--out-dir", str(out / "tables"), "--plot", str(out / "prune.png")])
    return res, out


def test_output_files_and_structure(result):
    res, out = result
    saved = json.loads((out / "tables" / "results.json").read_text())
    assert saved["ks"] == [4, 32] and saved["K"] == 32 and saved["photos"]["n"] == 2
    labels = [v["label"] for v in saved["variants"]]
    assert labels == ["nested prefix", "nested adaptive (MSE)", "nested adaptive (PSNR)", "control prefix",
                      "control random", "control divprune", "control kmedoids", "control kmeans", "control tome"]
    keys = {"k", "mean_tokens", "min_tokens", "max_tokens", "bits", "bytes", "psnr", "ssim", "fm_mean_tokens",
            "fm_psnr", "accuracy"}
    for v in saved["variants"]:
        assert [r["k"] for r in v["rows"]] == [4, 32]
        for r in v["rows"]:
            assert set(r) == keys
            assert 5 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1 and 0 <= r["accuracy"] <= 1
    assert saved["classifier"]["train_n"] == 60 and saved["classifier"]["eval_n"] == 20
    assert 0 <= saved["classifier"]["acc_original"] <= 1
    assert [c["k"] for c in saved["codecs"]] == [4, 32] and set(saved["codec_curves"]) == {"JPEG", "WebP"}
    md = (out / "tables" / "results.md").read_text()
    assert "| method | k = 4 | k = 32 |" in md and "| nested adaptive (PSNR) |" in md and "Fashion-MNIST" in md
    assert (out / "prune.png").stat().st_size > 10_000


def test_equal_mean_tokens_and_bytes(result):
    res, _ = result
    v = {x["label"]: x for x in res["variants"]}
    bpt = res["tokenizers"]["nested"]["bits_per_token"]
    for i, k in enumerate(res["ks"]):
        for x in res["variants"]:  # every method spends the same mean number of tokens
            assert x["rows"][i]["mean_tokens"] == k and x["rows"][i]["fm_mean_tokens"] == k
        prefix = v["nested prefix"]["rows"][i]
        assert prefix["bits"] == pytest.approx(k * bpt)
        for alloc in ("MSE", "PSNR"):  # a prefix per image: tokens plus the length header
            assert v[f"nested adaptive ({alloc})"]["rows"][i]["bits"] == pytest.approx(k * bpt + math.log2(32))
        cbpt = res["tokenizers"]["control"]["bits_per_token"]
        for m in ("random", "divprune", "kmedoids", "kmeans", "tome"):  # which registers, unless all of them
            assert v[f"control {m}"]["rows"][i]["bits"] == pytest.approx(k * cbpt + math.log2(math.comb(32, k)))


def test_full_budget_rows_coincide(result):
    res, _ = result
    rows = {x["label"]: x["rows"][-1] for x in res["variants"]}  # k = K = 32
    same = ("psnr", "ssim", "fm_psnr", "accuracy", "min_tokens", "max_tokens")
    for label in ("nested adaptive (MSE)", "nested adaptive (PSNR)"):
        assert all(rows[label][key] == rows["nested prefix"][key] for key in same)
    for m in ("random", "divprune", "kmedoids", "kmeans", "tome"):
        assert all(rows[f"control {m}"][key] == rows["control prefix"][key] for key in same)
    # below K the adaptive allocation can only lengthen some prefixes by shortening others
    short = {x["label"]: x["rows"][0] for x in res["variants"]}
    assert short["nested adaptive (MSE)"]["max_tokens"] >= 4 >= short["nested adaptive (MSE)"]["min_tokens"]
