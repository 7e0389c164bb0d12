"""The vLLM plugin's settings rules, without vLLM (``vtok.integrations.vllm.settings`` imports none of it): what each
family offers, the startup errors, and the shape vtok.wrap gives a method for an image or a video."""

from __future__ import annotations

import pytest
import torch

from vtok.integrations.vllm import read, supported_methods
from vtok.integrations.vllm.settings import ItemShape


def cfg(**kw):
    return type("Cfg", (), kw)


def test_families_offer_what_their_context_allows():
    llava, qwen25, qwen3 = (set(supported_methods(f)) for f in ("llava", "qwen2_5_vl", "qwen3_vl"))
    assert {"random", "pool2d", "divprune", "uniform", "kmedoids", "visionzip", "cls_attn", "downsample"} <= llava
    assert {"visionzip", "cls_attn", "evs", "holitom", "vidcom2", "frame_merge"} <= qwen25
    assert {"visionzip", "divprune", "pool2d"} <= qwen3
    assert not {"evs", "holitom"} & (llava | qwen3)  # temporal strategies where videos are pruned only
    assert not {"downsample"} & (qwen25 | qwen3)  # resizes before Qwen's tower in vtok.wrap
    assert not {"hiprune", "query_budget", "fastv"} & qwen25
    for fam in (llava, qwen25, qwen3):
        assert not {"fastv", "hiprune", "cdpruner", "query_budget", "adaptive_length"} & fam


@pytest.mark.parametrize(("kw", "message"), [
    ({"vtok_method": "fastv"}, "needs context the plugin cannot supply on qwen2_5_vl: ['text_attn']"),
    ({"vtok_method": "query_budget"}, "reads optional context ['frame_scores', 'query']"),
    ({"vtok_method": "adaptive_length"}, "picks a length per image"),
    ({"vtok_method": "random", "vtok_keep": 1.5}, "vtok_keep must be a ratio in (0, 1]"),
    ({"vtok_method": "random", "vtok_options": {"sed": 1}}, "unknown option(s) ['sed']"),
    ({"vtok_keep": 0.5}, "vtok_method is not"),
])
def test_bad_settings_name_the_key(kw, message):
    with pytest.raises(ValueError, match="vtok:") as err:
        read(cfg(**kw), "qwen2_5_vl")
    assert message in str(err.value)


def test_item_shape_follows_vtok_wrap():
    evs, pool, div = (read(cfg(vtok_method=m, vtok_keep=0.25), "qwen2_5_vl") for m in ("evs", "pool2d", "divprune"))
    assert evs.item_shape(4, (3, 5)) == ItemShape(60, (3, 5), 4)  # temporal: frames and the grid
    assert div.item_shape(4, (3, 5)) == ItemShape(60, None, 4)  # image method: a video flattened
    assert pool.item_shape(1, (3, 5)) == ItemShape(15, (3, 5), 1)  # an image is one frame
    with pytest.raises(ValueError, match="'pool2d' needs an image grid and cannot prune a video of 4 frames"):
        pool.item_shape(4, (3, 5))
    feats = torch.randn(60, 8)
    out, sel = evs.prune(feats, evs.item_shape(4, (3, 5)))
    assert out.shape == (evs.count(60, (3, 5)), 8) == (15, 8)
    assert sel.emitted_keep().shape == (1, 15)


def test_llava_pool2d_counts_and_prunes_its_grid():
    s = read(cfg(vtok_method="pool2d", vtok_keep=0.25), "llava")
    assert s.count(576, (24, 24)) == 144
    out, _ = s.prune(torch.randn(576, 8), (24, 24))
    assert out.shape == (144, 8)
