"""demos/real_clip_patches.py on the real CLIP ViT-B/16 (one photo): the picture is written, every method ends at
the asked count, FasterVLM keeps the top of the very [CLS] attention the picture shows, ToMe's schedule is exact."""

from __future__ import annotations

import torch

import vtok
from tests.helpers import ROOT
from vtok.bench import load_tower
from vtok.images import sample_photo


def _demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_clip_patches", ROOT / "demos" / "real_clip_patches.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tome_schedule_ends_at_the_count():
    demo = _demo()
    for n, k, depth in [(196, 49, 12), (196, 22, 12), (196, 196, 12), (10, 3, 4)]:
        r = demo.tome_schedule(n, k, depth)
        assert len(r) == depth and sum(r) == n - k and max(r) - min(r) <= 1


def test_real_clip_demo(tmp_path):
    torch.set_num_threads(2)
    demo = _demo()
    rows = demo.run(tmp_path, ["coffee"], keep=0.25)
    assert (tmp_path / "real_clip_patches.png").stat().st_size > 10_000
    assert 0 < rows[0]["top10_mass"] <= 1 and rows[0]["top10_norm_x_median"] > 0

    model = load_tower("clip_b16", library="timm")
    x = demo.pixels(sample_photo("coffee", 224))
    attn, _ = demo.attention_and_norms(model, x)
    for method in (*demo.METHODS, "tome"):
        where, _ = demo.kept_patches(model, x, method, 0.25)
        assert int(where.max()) + 1 == 49, method  # 25 % of 196 patch tokens, every method exactly
    where, merges = demo.kept_patches(model, x, "fastervlm", 0.25)
    assert not merges
    assert set(torch.nonzero(where >= 0).flatten().tolist()) == set(attn.topk(49).indices.tolist())
    assert not hasattr(model, "_vtok_state")  # every patch undone: the tower is left as loaded
    assert vtok.get_method("fastervlm").placement.layer == -2  # the block the picture's attention map shows
