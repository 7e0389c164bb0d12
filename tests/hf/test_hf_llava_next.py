"""``vtok.wrap`` on tiny random-weight LLaVA-NeXT and LLaVA-OneVision models (anyres tiles, image-newline tokens).

Records per image: base view (16 tokens, grid 4 x 4) + high-res part (``h`` rows of ``w`` tokens, each row ending in
an ``image_newline`` token that is never pruned). The expected layout below is derived from the models' own packed
features (newline rows are the rows equal to ``model.model.image_newline``), not from the adapter. Budgets are per
image: ``resolve_k(keep, N)`` of its ``N`` prunable tokens, shared by its records in proportion to their sizes.
"""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_reference import assert_unwrap_bit_exact, greedy, greedy_ids, greedy_on_embeds
from tests.helpers.hf_tiny import image_features
from tests.helpers.hf_tiny_next import image_tokens, left_pad, pixels, prompt, tiny_llava_next, tiny_llava_onevision
from vtok.budget import resolve_k

pytest.importorskip("transformers")

SIDE = 4
N_BASE = SIDE * SIDE
SIZES = [(10, 56), (50, 50)]  # 2 x 8 high-res grid (2 tiles) / 8 x 8 (4 tiles; OneVision shrinks it to 5 x 5)
BUILD = {"next": tiny_llava_next, "onevision": tiny_llava_onevision}
FAMILIES = sorted(BUILD)


@pytest.fixture(scope="module")
def models():
    return {name: fn() for name, fn in BUILD.items()}


def _single(model, sizes=SIZES, seed=0, text=([1, 5, 9], [11, 12, 13]), **kw):
    """One sample holding ``sizes`` images: ``(ids, am, extra, counts)``."""
    pv, isz = pixels(sizes, model, seed=seed)
    counts = image_tokens(model, pv, isz, **kw)
    ids, am = left_pad([prompt(text[0], counts, text[1])])
    return ids, am, {"pixel_values": pv, "image_sizes": isz, **kw}, counts


@torch.no_grad()
def _layout(model, extra) -> list[tuple[int, torch.Tensor]]:
    """Expected records ``(n, protected)`` in prompt order, from the unwrapped model's packed features."""
    kw = {k: v for k, v in extra.items() if k not in ("pixel_values", "image_sizes")}
    feats = image_features(model.model.get_image_features(extra["pixel_values"], extra["image_sizes"], **kw))
    nl = model.model.image_newline
    out = []
    for f in feats:
        prot = (f == nl).all(-1)
        if f.shape[0] == N_BASE + 1:  # a single crop: base view + one newline
            assert prot.tolist() == [False] * N_BASE + [True]
            out.append((f.shape[0], prot))
            continue
        assert not prot[:N_BASE].any() and bool(prot[-1])
        out += [(N_BASE, prot[:N_BASE]), (f.shape[0] - N_BASE, prot[N_BASE:])]
    return out


def _images(layout) -> list[list[int]]:
    """The records (indices into ``layout``) of each image: a base view (16 tokens, nothing protected) and the
    high-res record after it, or one single-crop record."""
    out, i = [], 0
    while i < len(layout):
        n, prot = layout[i]
        two = n == N_BASE and not bool(prot.any())
        out.append([i, i + 1] if two else [i])
        i += 2 if two else 1
    return out


def _record_budgets(layout, keep) -> list[int]:
    """Per record, the prunable tokens it keeps, from the rule stated by hand: the image keeps ``k = resolve_k(keep,
    N)`` of its ``N`` prunable tokens; with two records, the base view takes ``round(k · n_base / N)`` (halves up: the
    largest remainder goes to the earlier record), at least one, and the high-res record the rest."""
    out = []
    for recs in _images(layout):
        frees = [len(layout[r][1]) - int(layout[r][1].sum()) for r in recs]
        k = resolve_k(keep, sum(frees))
        if len(recs) == 1:
            out.append(k)
            continue
        base = min(max(int(k * frees[0] / sum(frees) + 0.5), 1), k - 1)
        out += [base, k - base]
    return out


def _runs(ids: torch.Tensor, layout) -> list[torch.Tensor]:
    """Prompt positions of every record (its contiguous run of placeholders) of a one-sample prompt."""
    pos = (ids[0] == 250).nonzero().squeeze(1)
    out, used = [], 0
    for n, _ in layout:
        out.append(pos[used:used + n])
        used += n
    assert used == len(pos)
    return out


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [None, 1])
def test_keep_all_is_identity(models, family, layer):
    model = models[family]
    pv, isz = pixels(SIZES + [(56, 20)], model)
    counts = image_tokens(model, pv, isz)
    ids, am = left_pad([prompt([1, 5], counts[:2], [11, 12]), prompt([3], counts[2:], [4, 5, 6, 7])])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=isz).logits
        with vtok.wrapped(model, "divprune", 1.0, layer=layer):
            out = model(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=isz).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_unwrap_is_bit_exact(models):
    for family in FAMILIES:
        model = models[family]
        ids, am, extra, _ = _single(model)
        inp = {"input_ids": ids, "attention_mask": am, **extra}
        assert_unwrap_bit_exact(model, inp, [("visionzip", 0.25, None, lambda m, inp=inp: m(**inp)),
                                             ("random", 0.25, 1, lambda m, inp=inp: greedy(m, inp, n=3))])
        assert "get_image_features" not in vars(model.model)


# ---------------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize("family", FAMILIES)
def test_records_follow_the_packed_layout(models, family):
    model = models[family]
    ids, am, extra, _ = _single(model, sizes=SIZES + [(56, 20)])
    want = _layout(model, extra)
    with torch.no_grad(), vtok.wrapped(model, "visionzip", 0.5):
        model(input_ids=ids, attention_mask=am, **extra)
        recs = model._vtok_runtime.records
    assert [r.n for r in recs] == [n for n, _ in want]
    assert [r.image for r in recs] == [0, 0, 1, 1, 2, 2]
    for r, (n, prot) in zip(recs, want, strict=True):
        rows = int(prot.sum())
        if rows == 0:
            assert r.protected is None and r.grid == (SIDE, SIDE)
        else:
            assert torch.equal(r.protected, prot)
            h, w = r.grid
            assert h == rows and h * (w + 1) == n  # the grid of the prunable tokens
            assert prot.view(h, w + 1)[:, -1].all()  # one newline closing every row
        assert r.ctx["cls_attn"].shape == (n,) and r.ctx["keys"].shape[1] == n
    if family == "onevision":
        assert recs[3].grid == (5, 5)  # 8 x 8 shrunk to anyres_max_2


@torch.no_grad()
def _crop_scores(model, extra, layer_idx=None, rows="cls"):
    """Per crop: projected features ``[crops, N, D]`` and the vision-side score ``[crops, N]`` of tower layer
    ``layer_idx`` (default: the one producing ``vision_feature_layer``): its CLS softmax row (CLIP, ``rows="cls"``)
    or the attention each token receives (SigLIP, or ``rows="all"``)."""
    m = model.model
    pv = torch.cat([p[:c] for p, c in zip(extra["pixel_values"], _crop_counts(model, extra), strict=True)])
    tower = m.vision_tower.vision_model if hasattr(m.vision_tower, "vision_model") else m.vision_tower
    hs = m.vision_tower(pv, output_hidden_states=True).hidden_states
    fl = model.config.vision_feature_layer
    li = fl % len(hs) - 1 if layer_idx is None else layer_idx
    layer = tower.encoder.layers[li]
    has_cls = hasattr(tower.embeddings, "class_embedding")
    drop = 1 if has_cls and model.config.vision_feature_select_strategy == "default" else 0
    feats = m.multi_modal_projector(hs[fl][:, drop:])
    y = layer.layer_norm1(hs[li])  # hidden_states[i] is layer i's input
    a = layer.self_attn
    q = a.q_proj(y).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    k = a.k_proj(y).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    p = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1)  # [crops, H, T, T]
    score = p[:, :, 0].mean(1) if has_cls and rows == "cls" else p.mean((1, 2))
    return feats, score[:, drop:]


def _crop_counts(model, extra):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(s.tolist(), model.config.image_grid_pinpoints, 28) for s in extra["image_sizes"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_cls_attn_follows_each_token_to_its_crop(models, family):
    # (10, 56): no interpolation in either family, so every packed token is one crop token: find it by its feature
    model = models[family]
    ids, am, extra, _ = _single(model, sizes=[(10, 56)])
    feats, score = _crop_scores(model, extra)
    with torch.no_grad():
        packed = image_features(model.model.get_image_features(**extra))[0][N_BASE:]
    with torch.no_grad(), vtok.wrapped(model, "visionzip", 0.5):
        model(input_ids=ids, attention_mask=am, **extra)
        base, hi = model._vtok_runtime.records
    torch.testing.assert_close(base.ctx["cls_attn"], score[0].float())
    free = ~hi.protected
    flat = feats[1:].flatten(0, 1)  # the high-res crops' tokens
    src = torch.cdist(packed[free], flat).argmin(1)
    assert torch.cdist(packed[free], flat).min(1).values.max() < 1e-3  # nearest others are ~0.05 away
    torch.testing.assert_close(hi.ctx["cls_attn"][free], score[1:].flatten()[src].float())
    assert len(set(src.tolist())) == int(free.sum())
    # HiPrune's context: mid_attn from layer floor(9/24 * 3) = 1, both scores from all query rows
    _, mid = _crop_scores(model, extra, layer_idx=1, rows="all")
    _, last = _crop_scores(model, extra, rows="all")
    with torch.no_grad(), vtok.wrapped(model, "hiprune", 0.5):
        model.model.get_image_features(**extra)  # the records alone (the high-res record has no grid yet)
        base, hi = model._vtok_runtime.records
    for key, want in (("mid_attn", mid), ("cls_attn", last)):
        torch.testing.assert_close(base.ctx[key], want[0].float())
        torch.testing.assert_close(hi.ctx[key][free], want[1:].flatten()[src].float())


# ---------------------------------------------------------------------------------------------------- budgets
def _image_after(keep, layout) -> int:
    """Tokens the images of ``layout`` keep: ``resolve_k`` of each image's prunable tokens, plus its newlines."""
    out = 0
    for recs in _images(layout):
        rows = sum(int(layout[r][1].sum()) for r in recs)
        out += resolve_k(keep, sum(layout[r][0] for r in recs) - rows) + rows
    return out


def _check_budgets(model, ids, layout, method, keep, kept):
    kept = set(kept)
    runs = _runs(ids, layout)
    for (_, prot), run, k in zip(layout, runs, _record_budgets(layout, keep), strict=True):
        assert set(run[prot].tolist()) <= kept  # every newline kept
        assert len(set(run[~prot].tolist()) & kept) == k
    for recs in _images(layout):
        n = sum(layout[r][0] for r in recs)
        rows = sum(int(layout[r][1].sum()) for r in recs)
        got = sum(len(set(runs[r].tolist()) & kept) for r in recs)
        assert got == vtok.retained_count(method, n, keep, protected=rows) == resolve_k(keep, n - rows) + rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("random", 0.3, None), ("divprune", 3, None), ("random", 0.25, 1),
                                               ("fastv", 0.4, 2)])
def test_newlines_kept_and_budgets_exact(models, family, method, keep, layer):
    model = models[family]
    cases = [_single(model, sizes=SIZES + [(56, 20)])]
    if family == "onevision":  # several images in one sample: one crop each (base view + one newline)
        cases.append(_single(model, sizes=[(50, 50), (10, 56)], batch_num_images=torch.tensor([2])))
    for ids, am, extra, _ in cases:
        layout = _layout(model, extra)
        seen: list[torch.Tensor] = []

        def grab(mod, args, kw, seen=seen):
            seen.append(args[0] if args else kw["hidden_states"])

        handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
                model(input_ids=ids, attention_mask=am, **extra)
                st = vtok.stats(model)
        finally:
            handle.remove()
        _check_budgets(model, ids, layout, method, keep, st["per_sample"][0]["kept"])
        n_lines = sum(int(p.sum()) for _, p in layout)
        after = _image_after(keep, layout)
        assert st["per_sample"][0]["visual_before"] == sum(n for n, _ in layout)
        assert st["per_sample"][0]["visual_after"] == after
        if layer is None:  # the language model's input holds every image_newline row
            x = seen[0][0]
            assert int((x == model.model.image_newline).all(-1).sum()) == n_lines
            assert x.shape[0] == ids.shape[1] - sum(n for n, _ in layout) + after


def test_grid_methods_on_high_res(models):
    """pool2d on the high-res record pools its newline-free grid: counts equal retained_count per image."""
    model = models["next"]
    ids, am, extra, _ = _single(model)
    layout = _layout(model, extra)
    want = _image_after(0.25, layout)
    with torch.no_grad(), vtok.wrapped(model, "pool2d", 0.25):
        model(input_ids=ids, attention_mask=am, **extra)
        assert vtok.stats(model)["per_sample"][0]["visual_after"] == want


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("random", 20, None), ("divprune", 20, 1),
                                               ("random", [20, 9], [None, 2]), ("uniform", 0.3, None)])
def test_keep_is_the_images_total(models, family, method, keep, layer):
    """An int keep is the image's count of prunable tokens (more than a base view's 16 is fine), newlines on top, and
    ``vtok.stats`` says so per image: ``after == k + protected``."""
    model = models[family]
    ids, am, extra, _ = _single(model)
    layout = _layout(model, extra)
    last = keep[-1] if isinstance(keep, list) else keep
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        model(input_ids=ids, attention_mask=am, **extra)
        st = vtok.stats(model)
    per = st["per_image"]
    assert len(per) == len(_images(layout)) == 2
    for d, recs in zip(per, _images(layout), strict=True):
        rows = sum(int(layout[r][1].sum()) for r in recs)
        assert (d["before"], d["protected"]) == (sum(layout[r][0] for r in recs), rows)
        assert d["after"] == resolve_k(last, d["before"] - rows) + rows
        assert d["after"] == vtok.retained_count(method, d["before"], last, protected=rows)
    _check_budgets(model, ids, layout, method, last, st["per_sample"][0]["kept"])


# ---------------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def _manual(model, ids, extra, layout, keep, positions, steps=16):
    """Uniform pruning by hand: embed, scatter the features, drop the unkept image tokens, run the language model."""
    m = model.model
    feats = torch.cat(list(image_features(m.get_image_features(extra["pixel_values"], extra["image_sizes"]))))
    x = m.get_input_embeddings()(ids)
    x = x.masked_scatter((ids == 250)[..., None], feats)
    keep_mask = ids[0] != 250
    for (_, prot), run, k in zip(layout, _runs(ids, layout), _record_budgets(layout, keep), strict=True):
        free = run[~prot]
        j = torch.arange(k)
        keep_mask[free[((2 * j + 1) * len(free)) // (2 * k)]] = True
        keep_mask[run[prot]] = True
    kept = keep_mask.nonzero().squeeze(1)
    x = x[:, kept]
    pos = kept[None] if positions == "original" else torch.arange(len(kept))[None]
    nxt = ids.shape[1] if positions == "original" else len(kept)
    return (*greedy_on_embeds(model, m.language_model, x, pos, nxt, steps), kept)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_pre_llm_equals_manual_pruning(models, family, positions):
    model = models[family]
    ids, am, extra, _ = _single(model)
    layout = _layout(model, extra)
    ref_logits, ref_toks, kept = _manual(model, ids, extra, layout, 0.3, positions)
    with torch.no_grad(), vtok.wrapped(model, "uniform", 0.3, positions=positions):
        logits = model(input_ids=ids, attention_mask=am, **extra).logits
        assert vtok.stats(model)["per_sample"][0]["kept"] == kept.tolist()
        toks = greedy_ids(model, ids, am, **extra)[0].tolist()
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert toks == ref_toks


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "fastv", "pdrop"])
def test_in_llm_cached_equals_no_cache(models, family, method):
    """Issue 29's case: FastV / PyramidDrop scored the last *generated* token's attention on every uncached step."""
    model = models[family]
    ids, am, extra, _ = _single(model)
    with torch.no_grad(), vtok.wrapped(model, method, 0.3, layer=1):
        a = greedy_ids(model, ids, am, **extra)
        b = greedy_ids(model, ids, am, use_cache=False, **extra)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("divprune", 0.3, None), ("visionzip", 0.4, None),
                                               ("random", 0.3, 1), ("random", [0.5, 0.25], [None, 2]),
                                               ("fitprune", [0.5, 0.25], [1, 2]), ("mustdrop", 0.5, None),
                                               ("sparsevlm", [0.5, 0.25], [1, 2])])
def test_batch_equals_one_by_one(models, family, method, keep, layer):
    model = models[family]
    sizes = [(10, 56), (50, 50)]  # different tile counts (3 / 5 crops) and unpadding
    pv, isz = pixels(sizes, model, seed=3)
    counts = image_tokens(model, pv, isz)
    rows = [prompt([1, 5, 9], counts[:1], [11, 12, 13]), [4, 5, 6, 7], prompt([3], counts[1:], [11, 12, 13, 14])]
    ids, am = left_pad(rows)
    images = {0: slice(0, 1), 2: slice(1, 2)}
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        logits = model(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=isz).logits[:, -1]
        gen = greedy_ids(model, ids, am, pixel_values=pv, image_sizes=isz)
        for i, r in enumerate(rows):
            ids1, am1 = left_pad([r])
            extra = {"pixel_values": pv[images[i]], "image_sizes": isz[images[i]]} if i in images else {}
            one = model(input_ids=ids1, attention_mask=am1, **extra).logits[:, -1]
            assert (one[0] - logits[i]).abs().max() <= 1e-4
            assert greedy_ids(model, ids1, am1, **extra)[0].tolist() == gen[i].tolist()


FRAMES = 4


def _video_inputs(model, with_image=True, seed=5):
    """A OneVision prompt with an image (optional) and a 4-frame video (each frame pooled to 2 x 2, one newline)."""
    video = torch.randn(1, FRAMES, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    n_video = FRAMES * (SIDE // 2) ** 2 + 1
    extra = {"pixel_values_videos": video}
    ids = [1, 5]
    if with_image:
        pv, isz = pixels([(10, 56)], model)
        ids = prompt([1, 5], image_tokens(model, pv, isz), [9])
        extra |= {"pixel_values": pv, "image_sizes": isz}
    ids, am = left_pad([ids + [251] * n_video + [11, 12]])
    return ids, am, extra


def _embedded_prompt(model, ids, am, extra) -> torch.Tensor:
    """The unpruned ``inputs_embeds`` the language model receives (captured from the unwrapped model)."""
    got = {}
    def grab(mod, args, kwargs):
        got.setdefault("x", kwargs["inputs_embeds"])

    h = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, **extra)
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize("layer", [None, 1])
def test_onevision_video_keep_all_is_identity(models, layer):
    model = models["onevision"]
    ids, am, extra = _video_inputs(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, **extra).logits
        with vtok.wrapped(model, "frame_merge" if layer is None else "random", 1.0, layer=layer):
            assert (model(input_ids=ids, attention_mask=am, **extra).logits - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method,keep", [("frame_merge", 0.5), ("temporal_pool", 0.5), ("uniform", 0.25),
                                         ("holitom", 0.5)])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_onevision_video_pre_llm_equals_manual(models, method, keep, positions):
    """A video alone: its frames through ``vtok.compress`` by hand (``frames=4``, pooled grid 2 x 2 for a temporal
    method; an image strategy sees the frames flattened), the newline kept last, the rest of the prompt as is."""
    model = models["onevision"]
    ids, am, extra = _video_inputs(model, with_image=False)
    x = _embedded_prompt(model, ids, am, extra)[0]
    run = (ids[0] == 251).nonzero().squeeze(1)
    free, newline = run[:-1], run[-1:]
    ctx = {"grid": (SIDE // 2, SIDE // 2)} if vtok.get_method(method).family == "temporal" else {}
    vals, sel = vtok.compress(x[free][None], method, keep, frames=FRAMES, **ctx)
    src = torch.cat([torch.arange(run[0]), free[sel.emitted_keep()[0]], newline, torch.arange(run[-1] + 1, len(x))])
    xr = torch.cat([x[:run[0]], vals[0], x[newline], x[run[-1] + 1:]])[None]
    pos = src[None] if positions == "original" else torch.arange(len(src))[None]
    nxt = ids.shape[1] if positions == "original" else len(src)
    logits0, toks = greedy_on_embeds(model, model.model.language_model, xr, pos, nxt, steps=8)
    with torch.no_grad(), vtok.wrapped(model, method, keep, positions=positions):
        got = model(input_ids=ids, attention_mask=am, **extra).logits
        per = vtok.stats(model)["per_image"]
        gen = greedy_ids(model, ids, am, n=8, **extra)[0].tolist()
    assert per == [{"image": 0, "sample": 0, "video": True, "before": len(run), "after": len(src) - len(x) + len(run),
                    "protected": 1}]  # the video's newline
    assert got.shape == logits0.shape
    assert (got - logits0).abs().max() <= 1e-4
    assert gen == toks


@pytest.mark.parametrize("method,keep,layer", [("frame_merge", 0.5, None),
                                               (["holitom", "holitom_llm"], [0.5, 0.25], [None, 1])])
def test_onevision_video_batch_equals_one_by_one(models, method, keep, layer):
    """A video + image prompt and a video-only prompt (left-padded) equal each prompt run alone (HoliTom: its outer
    merge before the LLM and its inner merge at layer 1, one method per stage)."""
    model = models["onevision"]
    ids1, _, ex1 = _video_inputs(model, with_image=True, seed=5)
    ids2, _, ex2 = _video_inputs(model, with_image=False, seed=6)
    rows = [ids1[0].tolist(), ids2[0].tolist()]
    ids, am = left_pad(rows)
    extra = {"pixel_values": ex1["pixel_values"], "image_sizes": ex1["image_sizes"],
             "pixel_values_videos": torch.cat([ex1["pixel_values_videos"], ex2["pixel_values_videos"]])}
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        last = model(input_ids=ids, attention_mask=am, **extra).logits[:, -1]
        gen = greedy_ids(model, ids, am, n=6, **extra)
        for i, (r, ex) in enumerate(zip(rows, [ex1, ex2], strict=True)):
            i1, a1 = left_pad([r])
            assert (model(input_ids=i1, attention_mask=a1, **ex).logits[0, -1] - last[i]).abs().max() <= 1e-4
            assert greedy_ids(model, i1, a1, n=6, **ex)[0].tolist() == gen[i].tolist()


def test_onevision_video_refuses_methods_needing_vision_scores(models):
    model = models["onevision"]
    ids, am, extra = _video_inputs(model)
    with vtok.wrapped(model, "visionzip", 0.5), pytest.raises(NotImplementedError, match="cls_attn"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, **extra)
