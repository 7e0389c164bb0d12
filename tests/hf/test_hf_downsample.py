"""``downsample``: fewer visual tokens by a lower input resolution (Qwen2-VL / 2.5-VL: the image is resized before the
tower), the equivalent grid pooling on fixed-resolution towers and plain tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
import vtok  # noqa: E402
from tests.helpers.hf_tiny import image_features  # noqa: E402
from tests.helpers.hf_tiny_qwen import IMAGE_TOKEN, MERGE, PATCH, images, left_pad, n_tokens, qwen_prompt  # noqa: E402
from tests.helpers.hf_tiny_qwen import TEMPORAL as TP  # noqa: E402
from tests.hf import test_hf_qwen  # noqa: E402
from tests.hf.test_hf_qwen import _greedy_reference, _lm_logits, _reindex_reference  # noqa: E402
from vtok.hooks.hf import _resize, stats, unwrap, wrap  # noqa: E402
from vtok.pruners._grid import grid_bins as _bins  # noqa: E402
from vtok.pruners._grid import pool_grid  # noqa: E402

# the Qwen tests' fixtures: both tiny families (module scope), one intra-op thread
model, _one_thread = test_hf_qwen.model, test_hf_qwen._one_thread


def _inputs(grids, seed=1, before=(1, 5), after=(11, 12, 13)):
    pix, thw = images(grids, seed=seed)
    return {**left_pad([qwen_prompt(list(before), grids, list(after))]), "pixel_values": pix, "image_grid_thw": thw}


# ------------------------------------------------------------------------------------------------ pure functions
def test_unflatten_inverts_the_qwen_processor_layout():
    """The processor's rows of an image needing no resize (multiples of 28 px) unflatten to the normalised image."""
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    out = proc(images=[img], return_tensors="pt")
    thw = tuple(int(v) for v in out["image_grid_thw"][0])
    assert thw == (1, 4, 6)
    pix = _resize.unflatten(out["pixel_values"], thw, PATCH, MERGE, TP)
    mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
    want = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std
    assert pix.shape == (TP, 3, 56, 84)
    assert torch.allclose(pix[0], want, atol=1e-4) and torch.equal(pix[0], pix[1])
    rows, grid = _resize.flatten(pix, PATCH, MERGE, TP)
    assert grid == thw and torch.equal(rows, out["pixel_values"])


def test_resize_is_close_to_the_processors_own_smaller_resolution():
    """Resizing the rows to half the grid ≈ the processor run at a quarter of the pixels (PIL bicubic on uint8 vs
    torch anti-aliased bicubic on normalised floats: rounding and clipping differ)."""
    from transformers import Qwen2VLImageProcessor

    skimage = pytest.importorskip("skimage.data")
    img = np.ascontiguousarray(skimage.astronaut()[::2, ::2][:224, :224])  # a real photo, 224 x 224 x 3
    big = Qwen2VLImageProcessor(min_pixels=224 * 224, max_pixels=224 * 224)(images=[img], return_tensors="pt")
    small = Qwen2VLImageProcessor(min_pixels=112 * 112, max_pixels=112 * 112)(
        images=[np.array(_pil_resize(img, 112))], return_tensors="pt")
    rows, grid = _resize.resize_rows(big["pixel_values"], (1, 16, 16), (8, 8), PATCH, MERGE, TP)
    assert grid == (1, 8, 8) == tuple(int(v) for v in small["image_grid_thw"][0])
    diff = (rows - small["pixel_values"]).abs()
    assert float(diff.mean()) < 0.03 and float(diff.max()) < 0.5  # normalised units (1 grey level ≈ 0.015)


def _pil_resize(img, side):
    from PIL import Image

    return Image.fromarray(img).resize((side, side), Image.BICUBIC)


def test_spread_then_pool2d_returns_the_small_tokens():
    small = torch.randn(6, 5)
    full = _resize.spread(small, (5, 4), (3, 2))
    out, _ = vtok.compress(full[None], "downsample", keep=6, grid=(5, 4))
    assert torch.allclose(out[0], small, atol=1e-6)


def test_downsample_is_pool2d_on_plain_tensors():
    x = torch.randn(2, 48, 8)
    a, sa = vtok.compress(x, "downsample", keep=12, grid=(6, 8))
    b, sb = vtok.compress(x, "pool2d", keep=12, grid=(6, 8))
    assert torch.equal(a, b) and torch.equal(sa.keep, sb.keep)
    assert vtok.get_method("downsample").placement.resize_input


# ------------------------------------------------------------------------------------------------ through vtok.wrap
def test_keep_all_is_identity(model):
    inp = _inputs([(1, 8, 8), (1, 6, 4)])
    with torch.no_grad():
        ref = model(**inp).logits
        wrap(model, "downsample", 1.0)
        try:
            out = model(**inp).logits
        finally:
            unwrap(model)
    assert torch.equal(out, ref)


def _reference(m, grids, inp, keep):
    """By hand: each image's rows resized to its ``pool2d`` grid, the tower run on them, the tokens put where the
    placeholders' cell centres were; reindexed 3-D positions."""
    ids = inp["input_ids"][0].tolist()
    embeds = m.model.get_input_embeddings()(inp["input_ids"])[0]
    start, rows, kinds, img, i, patches = 0, [], [], 0, 0, 0
    small = []
    for t, h, w in grids:
        part = inp["pixel_values"][start:start + t * h * w]
        start += t * h * w
        k = vtok.budget.resolve_k(keep, n_tokens((t, h, w)))
        oh, ow = pool_grid(h // MERGE, w // MERGE, k)
        r, g = _resize.resize_rows(part, (t, h, w), (oh * MERGE, ow * MERGE), PATCH, MERGE, TP)
        with torch.no_grad():
            f = image_features(m.model.get_image_features(r, torch.tensor([g])))[0]
        small.append((f, (h // MERGE, w // MERGE), (oh, ow)))
        patches += g[0] * g[1] * g[2]
    while i < len(ids):
        if ids[i] != IMAGE_TOKEN:
            rows.append(embeds[i])
            kinds.append(("text", 0, 0))
            i += 1
            continue
        f, (h, w), (oh, ow) = small[img]
        _, rc = _bins(h, oh, f.device)
        _, cc = _bins(w, ow, f.device)
        for j in range(oh * ow):
            rows.append(f[j])
            kinds.append((f"image{img}", int(rc[j // ow]), int(cc[j % ow])))
        i += h * w
        img += 1
    return torch.stack(rows)[None], _reindex_reference(kinds), patches


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_equals_the_tower_on_the_resized_image(model, keep):
    grids = [(1, 8, 8), (1, 8, 4)]
    inp = _inputs(grids)
    x, pos, patches = _reference(model, grids, inp, keep)
    want = _lm_logits(model, x, pos)
    seen = []
    h = model.model.visual.patch_embed.register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0]))
    wrap(model, "downsample", keep)
    try:
        with torch.no_grad():
            got = model(**inp).logits
        per = stats(model)["per_image"]
        with torch.no_grad():
            toks = model.generate(**inp, max_new_tokens=8, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    finally:
        unwrap(model)
        h.remove()
    assert seen[0] == patches < sum(t * hh * ww for t, hh, ww in grids)  # the tower ran on fewer patches
    assert [(d["before"], d["after"]) for d in per] == [(n_tokens(g), vtok.budget.resolve_k(keep, n_tokens(g)))
                                                        for g in grids]
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4
    assert toks == _greedy_reference(model, x, pos, int(pos.max()) + 1, n=8)


def test_batch_equals_one_by_one(model):
    grids = [[(1, 8, 8)], [(1, 4, 8), (1, 8, 4)]]
    rows = [qwen_prompt([1, 5], grids[0], [11, 12]), qwen_prompt([3], grids[1], [11, 12, 13, 14])]
    pix = [images(g, seed=s)[0] for s, g in enumerate(grids)]
    batch = {**left_pad(rows), "pixel_values": torch.cat(pix),
             "image_grid_thw": torch.tensor([g for gs in grids for g in gs])}
    wrap(model, "downsample", 0.25)
    try:
        with torch.no_grad():
            last = model(**batch).logits[:, -1]
            for b in range(2):
                one = {**left_pad([rows[b]]), "pixel_values": pix[b], "image_grid_thw": torch.tensor(grids[b])}
                assert (model(**one).logits[0, -1] - last[b]).abs().max() <= 1e-4
    finally:
        unwrap(model)


def test_per_sample_keeps_are_refused(model):
    inp = _inputs([(1, 8, 8)])
    inp2 = {k: torch.cat([v, v]) if k != "image_grid_thw" else torch.cat([v, v]) for k, v in inp.items()}
    wrap(model, "downsample", [0.5, 0.25])
    try:
        with pytest.raises(NotImplementedError, match="one keep"), torch.no_grad():
            model(**inp2)
    finally:
        unwrap(model)


def test_llava_downsample_is_grid_pooling():
    """A fixed-resolution tower (LLaVA's CLIP): downsample = pool2d, exactly."""
    from tests.helpers.hf_tiny import left_pad as llava_pad
    from tests.helpers.hf_tiny import llava_prompt, tiny_llava

    m = tiny_llava()
    ids, mask = llava_pad([llava_prompt([1, 2], 1, [3, 4, 5]), llava_prompt([6], 2, [3])])
    inp = {"input_ids": ids, "attention_mask": mask,
           "pixel_values": torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))}
    out = {}
    for method in ("pool2d", "downsample"):
        wrap(m, method, 0.25)
        try:
            with torch.no_grad():
                out[method] = m(**inp).logits
        finally:
            unwrap(m)
    assert torch.equal(out["pool2d"], out["downsample"])
