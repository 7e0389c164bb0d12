"""``vtok.wrap`` on a tiny random-weight InternVL (``vtok.hooks.hf.tiny.internvl``): 56 px tiles of 8 x 8 patches + CLS,
pixel shuffle 0.5 → 16 tokens (4 x 4) per tile; an image of ``t`` tiles is ``<img>``, ``16 t`` context tokens,
``</img>`` in the prompt and ``t`` consecutive rows of the flat ``pixel_values``.

Records: one per tile, grid ``(4, 4)``, the tiles of an image sharing its index. Budgets per image: ``k =
resolve_k(keep, 16 t)`` split over its equal tiles, ``k // t`` each, one more for the first ``k % t`` tiles (at least
one each). The expected context is computed here from the tower's own layers: the CLS softmax row (or the attention
each patch receives) and the keys of the layer producing the features, averaged over each 2 x 2 patch group
(``avg_pool2d``), independent of the adapter's use of ``pixel_shuffle``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtok
from tests.helpers.hf_reference import (
    assert_batch_equals_one_by_one,
    assert_unwrap_bit_exact,
    greedy,
    greedy_on_embeds,
)
from tests.helpers.hf_tiny import _one_thread, image_features  # noqa: F401  (autouse: one intra-op thread)
from vtok.budget import resolve_k
from vtok.hooks.hf.tiny import left_pad, tiny_inputs, tiny_model
from vtok.hooks.hf.tiny.internvl import IMAGE_SEQ, IMG_CONTEXT, internvl_pixels, internvl_run

pytest.importorskip("transformers")

SIDE = 8  # patches per tile side
G = 4  # tokens per tile side after the shuffle


@pytest.fixture(scope="module")
def model():
    return tiny_model("internvl")


@pytest.fixture(scope="module")
def qk_model():
    return tiny_model("internvl", qk_norm=True)


def _prompt(tiles, before=(1, 5, 9), after=(11, 12, 13)) -> list[int]:
    row = list(before)
    for t in tiles:
        row += internvl_run(t) + [7]
    return row + list(after)


def _inputs(samples: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs of prompts holding images of the given tile counts (a list per prompt)."""
    ids, am = left_pad([_prompt(s) for s in samples])
    tiles = [t for s in samples for t in s]
    return {"input_ids": ids, "attention_mask": am, **({"pixel_values": internvl_pixels(tiles, seed)} if tiles else {})}


def _tile_budgets(tiles: int, keep) -> list[int]:
    k = resolve_k(keep, IMAGE_SEQ * tiles)
    if k <= tiles:
        return [1] * tiles
    return [k // tiles + (1 if i < k % tiles else 0) for i in range(tiles)]


@torch.no_grad()
def _tile_context(model, pv, layer_idx=None, rows="cls") -> tuple[torch.Tensor, torch.Tensor]:
    """``(score [tiles, 16], keys [tiles, H, 16, dh])`` of tower layer ``layer_idx`` (default: the last, which
    produces ``vision_feature_layer=-1``), from the input it receives, averaged over 2 x 2 patch groups."""
    layers = model.model.vision_tower.encoder.layer
    li = len(layers) - 1 if layer_idx is None else layer_idx
    got = {}
    h = layers[li].register_forward_pre_hook(lambda mod, a: got.setdefault("x", a[0]))
    try:
        model.model.vision_tower(pixel_values=pv)
    finally:
        h.remove()
    layer = layers[li]
    a = layer.attention
    y = layer.layernorm_before(got["x"])
    q = a.q_norm(a.q_proj(y)).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    k = a.k_norm(a.k_proj(y)).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    p = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1)  # [tiles, H, 65, 65]
    score = (p[:, :, 0].mean(1) if rows == "cls" else p.mean((1, 2)))[:, 1:]
    pooled = F.avg_pool2d(score.reshape(-1, 1, SIDE, SIDE), 2).flatten(1)
    kk = k[:, :, 1:]
    t, heads, _, dh = kk.shape
    kp = F.avg_pool2d(kk.reshape(t, heads, SIDE, SIDE, dh).permute(0, 1, 4, 2, 3).reshape(t, heads * dh, SIDE, SIDE), 2)
    return pooled, kp.reshape(t, heads, dh, G * G).transpose(-1, -2)


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("layer", [None, 1])
def test_keep_all_is_identity(model, layer):
    inp = tiny_inputs(model, [1, 2, 0])
    with torch.no_grad():
        ref = model(**inp).logits
        with vtok.wrapped(model, "divprune", 1.0, layer=layer):
            out = model(**inp).logits
    assert torch.equal(out, ref)


def test_unwrap_is_bit_exact(model):
    inp = tiny_inputs(model, [2, 1])
    assert_unwrap_bit_exact(model, inp, [("visionzip", 0.25, None, lambda m: m(**inp)),
                                         ("random", 0.25, 1, lambda m: greedy(m, inp, n=3))])
    inner = model.model
    assert "get_image_features" not in vars(inner)
    assert not inner._forward_pre_hooks and not inner._forward_hooks


# ---------------------------------------------------------------------------------------------------- records
def test_the_features_are_row_major_2x2_groups(model):
    """The grid claim: token ``(r, c)`` of a tile is the projection of its patches ``(2r, 2c), (2r, 2c+1), (2r+1,
    2c), (2r+1, 2c+1)`` (the last layer's output, CLS dropped)."""
    pv = internvl_pixels([2])
    with torch.no_grad():
        feats = image_features(model.model.get_image_features(pixel_values=pv))
        h = model.model.vision_tower(pixel_values=pv).last_hidden_state[:, 1:]  # [2, 64, C]
        x = h.reshape(2, G, 2, G, 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, G * G, -1)
        want = model.model.multi_modal_projector(x)
    torch.testing.assert_close(feats, want)


@pytest.mark.parametrize("qk", [False, True])
def test_records_per_tile_with_pooled_context(model, qk_model, qk):
    m = qk_model if qk else model
    inp = tiny_inputs(m, [1, 2, 0])  # images of 3, 1 and 5 tiles
    score, keys = _tile_context(m, inp["pixel_values"])
    with torch.no_grad(), vtok.wrapped(m, "visionzip", 0.5):
        m(**inp)
        recs = m._vtok_runtime.records
    assert [r.image for r in recs] == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert all(r.n == IMAGE_SEQ and r.grid == (G, G) and r.protected is None for r in recs)
    torch.testing.assert_close(torch.stack([r.ctx["cls_attn"] for r in recs]), score)
    torch.testing.assert_close(torch.stack([r.ctx["keys"] for r in recs]), keys)


def test_hiprune_context(model):
    """HiPrune reads every query row (``score_rows="all"``) of the feature layer and of layer ``floor(0.375 · 3)``."""
    inp = tiny_inputs(model, [1])
    mid_layer = int(vtok.get_method("hiprune").placement.mid_layer * 3)
    mid, _ = _tile_context(model, inp["pixel_values"], layer_idx=mid_layer, rows="all")
    last, _ = _tile_context(model, inp["pixel_values"], rows="all")
    with torch.no_grad(), vtok.wrapped(model, "hiprune", 0.5):
        model.model.get_image_features(pixel_values=inp["pixel_values"])
        recs = model._vtok_runtime.records
    torch.testing.assert_close(torch.stack([r.ctx["mid_attn"] for r in recs]), mid)
    torch.testing.assert_close(torch.stack([r.ctx["cls_attn"] for r in recs]), last)


def test_generate_groups_pre_encoded_tiles(model):
    """transformers 5 ``generate`` encodes the images before the prompt is seen; their tiles are grouped in the
    prefill, so the budget is per image there too."""
    inp = tiny_inputs(model, [1, 2, 0])
    with torch.no_grad(), vtok.wrapped(model, "random", 0.3):
        model(**inp)
        fwd = vtok.stats(model)["per_image"]
        greedy(model, inp, n=4)
        gen = vtok.stats(model)["per_image"]
    want = [(0, 0, 48), (1, 1, 16), (2, 1, 80)]
    assert [(d["image"], d["sample"], d["before"]) for d in fwd] == want
    assert [(d["image"], d["sample"], d["before"]) for d in gen] == want
    assert [d["after"] for d in gen] == [d["after"] for d in fwd] == [resolve_k(0.3, n) for _, _, n in want]


def test_runs_not_a_whole_number_of_tiles_are_refused(model):
    inp = _inputs([[1]])
    ids = inp["input_ids"].clone()
    ids[0, (ids[0] == IMG_CONTEXT).nonzero()[3]] = 5  # one run becomes 3 + 12 tokens
    ids[0, 0] = IMG_CONTEXT  # and a 1-token run: as many placeholders as features, so the model itself accepts it
    with torch.no_grad(), vtok.wrapped(model, "random", 0.5), pytest.raises(RuntimeError, match="whole number"):
        model(**{**inp, "input_ids": ids})


# ---------------------------------------------------------------------------------------------------- budgets
def _check_tiles(ids, kept, tiles_per_image, keep):
    """Per tile of the one-sample prompt ``ids``, the kept placeholder columns number ``_tile_budgets``."""
    runs = (ids[0] == IMG_CONTEXT).nonzero().squeeze(1).split(IMAGE_SEQ)
    want = [k for t in tiles_per_image for k in _tile_budgets(t, keep)]
    assert [len(set(r.tolist()) & set(kept)) for r in runs] == want


@pytest.mark.parametrize("method,keep,layer", [("random", 0.3, None), ("visionzip", 12, None), ("divprune", 0.25, 1),
                                               ("random", [12, 7], [None, 2]), ("fastv", 0.4, 2),
                                               ("pool2d", 0.25, None), ("hiprune", 0.3, None)])
def test_stats_and_retained_count(model, method, keep, layer):
    tiles = [3, 1, 5]
    inp = _inputs([tiles])
    last = keep[-1] if isinstance(keep, list) else keep
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        model(**inp)
        st = vtok.stats(model)
    per = st["per_image"]
    assert [(d["before"], d["protected"], d["video"]) for d in per] == [(16 * t, 0, False) for t in tiles]
    for d, t in zip(per, tiles, strict=True):
        assert d["after"] == sum(_tile_budgets(t, last))
        if resolve_k(last, 16 * t) >= t and "grid" not in vtok.get_method(method).needs:
            assert d["after"] == vtok.retained_count(method, d["before"], last)
    s = st["per_sample"][0]
    assert (s["visual_before"], s["visual_after"]) == (16 * sum(tiles), sum(d["after"] for d in per))
    _check_tiles(inp["input_ids"], s["kept"], tiles, last)


def test_an_int_keep_below_the_tile_count_keeps_one_per_tile(model):
    inp = _inputs([[5]])
    with torch.no_grad(), vtok.wrapped(model, "random", 2):
        model(**inp)
        assert vtok.stats(model)["per_image"][0]["after"] == 5


# ---------------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def _manual(model, inp, tiles, method, keep, positions, steps=16):
    """Pre-LLM pruning by hand on a one-sample prompt: the unwrapped model's features scattered into the embeddings,
    ``vtok.compress`` per tile (its budget, grid 4 x 4, the pooled context), the rest of the prompt as is, then the
    language model on the pruned sequence; ``(first logits, greedy tokens, kept prompt columns)``."""
    m = model.model
    ids, pv = inp["input_ids"], inp["pixel_values"]
    feats = image_features(m.get_image_features(pixel_values=pv))  # [tiles, 16, D]
    rows = vtok.get_method(method).placement.score_rows
    score, keys = _tile_context(model, pv, rows=rows)
    ctx = {"cls_attn": score, "keys": keys}
    if method == "hiprune":
        ctx["mid_attn"], _ = _tile_context(model, pv, layer_idx=int(vtok.get_method(method).placement.mid_layer * 3),
                                           rows="all")
    x = m.get_input_embeddings()(ids)
    x = x.masked_scatter((ids == IMG_CONTEXT)[..., None], feats.reshape(-1, feats.shape[-1]).to(x.dtype))
    wanted = vtok.get_method(method).needs | vtok.get_method(method).uses
    runs = (ids[0] == IMG_CONTEXT).nonzero().squeeze(1).split(IMAGE_SEQ)
    budgets = [k for t in tiles for k in _tile_budgets(t, keep)]
    xs, src, prev = [], [], 0
    for i, (run, k) in enumerate(zip(runs, budgets, strict=True)):
        a = int(run[0])
        xs.append(x[0, prev:a])
        src.append(torch.arange(prev, a))
        kw = {key: v[i][None] for key, v in ctx.items() if key in wanted}
        vals, sel = vtok.compress(x[0, run][None], method, k, grid=(G, G), **kw)
        xs.append(vals[0])
        src.append(run[sel.emitted_keep()[0]])
        prev = int(run[-1]) + 1
    xs.append(x[0, prev:])
    src.append(torch.arange(prev, ids.shape[1]))
    xr, kept = torch.cat(xs)[None], torch.cat(src)
    pos = kept[None] if positions == "original" else torch.arange(len(kept))[None]
    nxt = ids.shape[1] if positions == "original" else len(kept)
    return (*greedy_on_embeds(model, m.language_model, xr, pos, nxt, steps), kept)


@pytest.mark.parametrize("method,keep", [("visionzip", 0.3), ("pool2d", 0.25), ("fastervlm", 12),
                                         ("hiprune", 0.4), ("divprune", 0.3)])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_pre_llm_equals_manual_pruning(model, method, keep, positions):
    tiles = [3, 1]
    inp = _inputs([tiles], seed=2)
    ref_logits, ref_toks, kept = _manual(model, inp, tiles, method, keep, positions)
    with torch.no_grad(), vtok.wrapped(model, method, keep, positions=positions):
        logits = model(**inp).logits
        assert vtok.stats(model)["per_sample"][0]["kept"] == kept.tolist()
        toks = greedy(model, inp)[0].tolist()
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert toks == ref_toks


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("method,keep,layer", [("visionzip", 0.3, None), ("divprune", 0.3, None),
                                               ("random", [0.5, 0.25], [None, 2]), ("fastv", 0.3, 1)])
def test_cached_generate_equals_uncached(model, method, keep, layer):
    inp = tiny_inputs(model, [1, 2, 0])
    with vtok.wrapped(model, method, keep, layer=layer):
        a = greedy(model, inp)
        b = greedy(model, inp, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method,keep,layer", [("divprune", 0.3, None), ("visionzip", 0.4, None),
                                               ("hiprune", 0.3, None), ("pool2d", 0.25, None), ("random", 0.3, 1),
                                               ("random", [0.5, 0.25], [None, 2]), ("fitprune", [0.5, 0.25], [1, 2]),
                                               ("sparsevlm", [0.5, 0.25], [1, 2])])
def test_batch_equals_one_by_one(model, method, keep, layer):
    samples = [[3, 1], [], [5]]  # different tile counts, a text-only sample, left padding
    inp = _inputs(samples, seed=3)
    pv = inp["pixel_values"]
    ones, used = [], 0
    for s in samples:
        ids, am = left_pad([_prompt(s)])
        ones.append({"input_ids": ids, "attention_mask": am})
        if s:
            ones[-1]["pixel_values"] = pv[used:used + sum(s)]
            used += sum(s)
    with vtok.wrapped(model, method, keep, layer=layer):
        assert_batch_equals_one_by_one(model, inp, ones)
