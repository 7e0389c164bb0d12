"""``vtok.wrap`` on tiny random-weight Idefics3 and SmolVLM models (``vtok.hooks.hf.tiny.idefics3``).

Records: one per crop (sub-image or global view), 16 tokens each (8 x 8 patches pixel-shuffled 2 x 2: grid 4 x 4);
an image's crops share its budget: ``k = resolve_k(keep, 16 · crops)``, ``k // crops`` per crop, the first ``k %
crops`` crops one more. Everything expected below is derived from the unwrapped model (its own image features, its
tower's attention recomputed by hand) and the processor's prompt layout, not from the adapter.
"""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_reference import assert_unwrap_bit_exact, greedy, greedy_on_embeds
from tests.helpers.hf_tiny import _one_thread  # noqa: F401  (autouse: one intra-op thread per module)
from vtok.budget import resolve_k
from vtok.hooks.hf.tiny import left_pad, tiny_model
from vtok.hooks.hf.tiny.idefics3 import IMAGE, SEQ, batch_pixels, crops, crops_of, prompt_tokens

pytest.importorskip("transformers")

FAMILIES = ["idefics3", "smolvlm"]
SIDE, SCALE = 8, 2  # patches per crop side, pixel-shuffle factor
GRID = (SIDE // SCALE, SIDE // SCALE)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in FAMILIES}


def _sample(splits, seed=0, text=((1, 5, 9), (11, 12, 13))):
    """One prompt holding images of ``splits`` (``(rows, cols)`` each; ``(0, 0)`` unsplit): its token ids and its
    crops ``[c, 3, 56, 56]`` in prompt order."""
    row, pix = list(text[0]), []
    for j, s in enumerate(splits):
        row += prompt_tokens(*s) + [7]
        pix.append(crops(crops_of(*s), seed=100 * seed + j))
    return row + list(text[1]), (torch.cat(pix) if pix else torch.zeros(0, 3, 56, 56))


def _batch(samples):
    """Left-padded inputs of ``_sample`` s, pixels in the processor's layout (none when no sample has an image)."""
    ids, am = left_pad([r for r, _ in samples])
    out = {"input_ids": ids, "attention_mask": am}
    if any(p.shape[0] for _, p in samples):
        out |= batch_pixels([p for _, p in samples])
    return out


@torch.no_grad()
def _features(model, pix) -> torch.Tensor:
    """The unwrapped model's features of crops ``pix [c, 3, 56, 56]``: ``[c, 16, D]``."""
    out = model.model.get_image_features(pix[None], torch.ones(1, *pix.shape[:1], 56, 56, dtype=torch.long))
    f = getattr(out, "pooler_output", out)
    f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
    return f.reshape(pix.shape[0], SEQ, -1)


@torch.no_grad()
def _scores(model, pix, mask=None, layer=-1):
    """By hand, per crop: the attention each patch receives in tower layer ``layer`` (softmax over the valid keys,
    averaged over heads and valid query rows), averaged over each 2 x 2 shuffle group: ``[c, 16]``; and the layer's
    keys averaged likewise ``[c, H, 16, dh]``. ``mask [c, 56, 56]``: the pixel mask (default all valid)."""
    m = model.model
    tower = m.vision_model
    lay = tower.encoder.layers[layer]
    got = {}

    def grab(mod, a, kw):
        got.setdefault("x", a[0] if a else kw["hidden_states"])

    h = lay.register_forward_pre_hook(grab, with_kwargs=True)
    pmask = torch.ones(pix.shape[0], 56, 56, dtype=torch.long) if mask is None else mask
    try:
        m.get_image_features(pix[None], pmask[None])
    finally:
        h.remove()
    valid = pmask.reshape(-1, SIDE, 7, SIDE, 7).sum((2, 4)).reshape(-1, SIDE * SIDE) > 0  # [c, 64] patches
    y = lay.layer_norm1(got["x"])
    a = lay.self_attn
    q = a.q_proj(y).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    k = a.k_proj(y).unflatten(-1, (a.num_heads, -1)).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * a.scale
    p = logits.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)  # [c, H, 64, 64]
    p = p * valid[:, None, :, None]
    recv = p.sum((1, 2)) / (a.num_heads * valid.sum(-1, keepdim=True))  # [c, 64]
    score = torch.zeros(pix.shape[0], SEQ)
    keys = torch.zeros(k.shape[0], k.shape[1], SEQ, k.shape[3])
    for t in range(SEQ):
        i, j = divmod(t, GRID[1])
        group = [(SCALE * i + r) * SIDE + SCALE * j + c for r in range(SCALE) for c in range(SCALE)]
        score[:, t] = recv[:, group].mean(1)
        keys[:, :, t] = k[:, :, group].mean(2)
    return score, keys


def _crop_budgets(splits, keep) -> list[int]:
    """Per crop, the tokens it keeps: the image keeps ``resolve_k(keep, 16 · crops)``, ``k // crops`` per crop, the
    first ``k % crops`` one more (at least one each)."""
    out = []
    for s in splits:
        c = crops_of(*s)
        k = resolve_k(keep, SEQ * c)
        out += [1] * c if k <= c else [k // c + (1 if j < k % c else 0) for j in range(c)]
    return out


# ---------------------------------------------------------------------------------------------------- basics
def test_registered():
    assert {"Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"} <= set(vtok.hooks.hf.supported())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [None, 1])
def test_keep_all_is_identity(models, family, layer):
    model = models[family]
    inp = _batch([_sample([(2, 2)], 0), _sample([], 1), _sample([(0, 0), (1, 2)], 2)])
    with torch.no_grad():
        ref = model(**inp).logits
        with vtok.wrapped(model, "divprune", 1.0, layer=layer):
            out = model(**inp).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_is_bit_exact(models, family):
    model = models[family]
    inp = _batch([_sample([(2, 2), (0, 0)])])
    assert_unwrap_bit_exact(model, inp, [("visionzip", 0.25, None, lambda m: m(**inp)),
                                         ("random", 0.25, 1, lambda m: greedy(m, inp, n=3))])
    assert "get_image_features" not in vars(model.model)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


# ---------------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize("family", FAMILIES)
def test_records_are_crops_grouped_by_image(models, family):
    model = models[family]
    splits = [(2, 2), (0, 0), (1, 2)]
    row, pix = _sample(splits)
    inp = _batch([(row, pix)])
    score, keys = _scores(model, pix)
    with torch.no_grad(), vtok.wrapped(model, "visionzip", 0.5):
        model(**inp)
        recs = model._vtok_runtime.records
    assert [r.n for r in recs] == [SEQ] * 9
    assert [r.image for r in recs] == [0] * 5 + [1] + [2] * 3
    assert all(r.grid == GRID and r.protected is None for r in recs)
    torch.testing.assert_close(torch.stack([r.ctx["cls_attn"] for r in recs]), score)
    torch.testing.assert_close(torch.stack([r.ctx["keys"] for r in recs]), keys)


def test_mid_attn_from_the_mid_layer(models):
    """HiPrune's context: ``mid_attn`` from tower layer ``floor(mid_layer · 3)``, ``cls_attn`` from the last."""
    model = models["idefics3"]
    row, pix = _sample([(1, 2)])
    mid_layer = vtok.get_method("hiprune").placement.mid_layer
    mid, _ = _scores(model, pix, layer=int(mid_layer * 3))
    last, _ = _scores(model, pix)
    with torch.no_grad(), vtok.wrapped(model, "hiprune", 0.5):
        model(**_batch([(row, pix)]))
        recs = model._vtok_runtime.records
    torch.testing.assert_close(torch.stack([r.ctx["mid_attn"] for r in recs]), mid)
    torch.testing.assert_close(torch.stack([r.ctx["cls_attn"] for r in recs]), last)


def test_padded_patches_are_masked(models):
    """A crop whose pixel mask leaves its last 3 patch rows out (``do_image_splitting=False`` pads a non-square
    image): the tower masks them as keys, ``cls_attn`` averages over its valid queries only, a shuffle group of only
    padding receives 0."""
    model = models["smolvlm"]
    row, pix = _sample([(0, 0)])
    mask = torch.ones(1, 56, 56, dtype=torch.long)
    mask[:, 35:] = 0  # patch rows 5..7
    pix = pix * mask[:, None]
    score, _ = _scores(model, pix, mask)
    inp = {**_batch([(row, pix)]), "pixel_attention_mask": mask[None]}
    with torch.no_grad():
        ref = model(**inp).logits
        with vtok.wrapped(model, "visionzip", 0.5):
            model(**inp)
            rec, = model._vtok_runtime.records
        with vtok.wrapped(model, "cls_attn", 1.0):
            assert torch.equal(model(**inp).logits, ref)
    torch.testing.assert_close(rec.ctx["cls_attn"], score[0])
    assert bool((rec.ctx["cls_attn"].view(GRID)[3] == 0).all())  # shuffle row 3 = patch rows 6, 7: all padding


# ---------------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def _manual(model, splits, method, keep, positions, steps=16):
    """The pruned prompt by hand: the unwrapped model's features per crop through ``vtok.compress`` (``grid`` 4 x 4,
    ``cls_attn`` from ``_scores``) with the crop's budget, the kept tokens in place of the crop's run, the text as
    is; logits of the pruned prompt and ``steps`` greedy tokens."""
    row, pix = _sample(splits)
    m = model.model
    feats = _features(model, pix)
    score, _ = _scores(model, pix)
    ids = torch.tensor(row)
    emb = m.get_input_embeddings()
    x = emb(ids)
    img = (ids == IMAGE).nonzero().squeeze(1).view(-1, SEQ)  # [crops, 16] prompt positions
    parts, cols = [], []
    start = 0
    for c, k in enumerate(_crop_budgets(splits, keep)):
        vals, sel = vtok.compress(feats[c][None], method, k, grid=GRID, cls_attn=score[c][None])
        parts += [x[start:img[c, 0]], vals[0]]
        cols += [torch.arange(start, int(img[c, 0])), img[c, sel.emitted_keep()[0]]]
        start = int(img[c, -1]) + 1
    parts.append(x[start:])
    cols.append(torch.arange(start, len(row)))
    xr = torch.cat(parts)[None]
    kept = torch.cat(cols)
    pos = kept[None] if positions == "original" else torch.arange(len(kept))[None]
    nxt = len(row) if positions == "original" else len(kept)
    return (*greedy_on_embeds(model, m.text_model, xr, pos, nxt, steps), kept, _batch([(row, pix)]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep", [("cls_attn", 0.3), ("divprune", 0.25), ("uniform", 7), ("pool2d", 0.25)])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_pre_llm_equals_manual_pruning(models, family, method, keep, positions):
    model = models[family]
    splits = [(2, 2), (0, 0)]
    ref_logits, ref_toks, kept, inp = _manual(model, splits, method, keep, positions)
    with torch.no_grad(), vtok.wrapped(model, method, keep, positions=positions):
        logits = model(**inp).logits
        st = vtok.stats(model)
        toks = greedy(model, inp)[0].tolist()
    assert st["per_sample"][0]["kept"] == kept.tolist()
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() <= 1e-4
    assert toks == ref_toks


# ---------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("random", 9, None), ("divprune", 0.3, None), ("random", 0.25, 1),
                                               ("random", [12, 6], [None, 2]), ("fastv", 0.4, 2)])
def test_stats_and_retained_count(models, family, method, keep, layer):
    """Per image ``after == resolve_k(keep, before) == vtok.retained_count`` (an int keep is the image's total, over
    all its crops), per crop the hand-stated split, for ``forward`` and for ``generate`` (transformers 5 encodes the
    images before the prompt: the records are grouped when the forward gets them)."""
    model = models[family]
    splits = [(2, 2), (0, 0), (1, 2)]
    row, pix = _sample(splits)
    inp = _batch([(row, pix)])
    last = keep[-1] if isinstance(keep, list) else keep
    img = (torch.tensor(row) == IMAGE).nonzero().squeeze(1).view(-1, SEQ)
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        model(**inp)
        st = vtok.stats(model)
        greedy(model, inp, n=2)
        st_gen = vtok.stats(model)
    for s in (st, st_gen):
        per = s["per_image"]
        assert [d["before"] for d in per] == [SEQ * crops_of(*x) for x in splits]
        for d in per:
            assert d["protected"] == 0
            assert d["after"] == resolve_k(last, d["before"]) == vtok.retained_count(method, d["before"], last)
        kept = set(s["per_sample"][0]["kept"])
        got = [len(set(img[c].tolist()) & kept) for c in range(len(img))]
        assert got == _crop_budgets(splits, last)
        assert s["per_sample"][0]["visual_before"] == SEQ * len(img)
        assert s["per_sample"][0]["visual_after"] == sum(got)


# ---------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("fastv", 0.3, 1), ("pdrop", [0.5, 0.25], [1, 2]),
                                               (["divprune", "fastv"], [0.5, 0.25], [None, 2])])
def test_cached_generate_equals_uncached(models, family, method, keep, layer):
    model = models[family]
    inp = _batch([_sample([(2, 2)], 0), _sample([], 1), _sample([(0, 0), (1, 2)], 2)])
    with vtok.wrapped(model, method, keep, layer=layer):
        a = greedy(model, inp)
        b = greedy(model, inp, use_cache=False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,keep,layer", [("divprune", 0.3, None), ("visionzip", 0.4, None),
                                               ("uniform", 12, None), ("random", 0.3, 1),
                                               ("random", [0.5, 0.25], [None, 2]), ("fitprune", [0.5, 0.25], [1, 2]),
                                               ("sparsevlm", [0.5, 0.25], [1, 2])])
def test_batch_equals_one_by_one(models, family, method, keep, layer):
    """A 1-image prompt, a text-only prompt and a 2-image prompt (left-padded; the shorter samples' crops padded with
    all-zero crops, which the model drops) equal each prompt run alone."""
    model = models[family]
    samples = [_sample([(2, 2)], 3, text=((1, 5, 9), (11, 12, 13))), _sample([], 4, text=((4, 5, 6, 7), ())),
               _sample([(0, 0), (1, 2)], 5, text=((3,), (11, 12, 13, 14)))]
    inp = _batch(samples)
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        logits = model(**inp).logits[:, -1]
        per = vtok.stats(model)["per_image"]
        gen = greedy(model, inp)
        for i, s in enumerate(samples):
            one = _batch([s])
            out = model(**one).logits[:, -1]
            assert (out[0] - logits[i]).abs().max() <= 1e-4
            assert greedy(model, one)[0].tolist() == gen[i].tolist()
    assert [(d["sample"], d["before"]) for d in per] == [(0, 80), (2, 16), (2, 48)]


# ---------------------------------------------------------------------------------------------------- processor
def _processor():
    """A real ``Idefics3Processor`` (SmolVLM writes image prompts the same way) for the tiny models: a word-level
    tokenizer whose image tokens have the tiny models' ids, 56 px crops, images resized to at most 112 px."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3 import Idefics3ImageProcessor

    from vtok.hooks.hf.tiny.idefics3 import FAKE, GLOBAL, ROW_COL

    words = {"<pad>": 0, "<unk>": 1, "what": 2, "is": 3, "this": 4, "<image>": IMAGE, "<fake_token_around_image>": FAKE,
             "<global-img>": GLOBAL, "<end_of_utterance>": 248}
    for i in range(6):
        for j in range(6):
            words[f"<row_{i + 1}_col_{j + 1}>"] = ROW_COL + 4 * i + j if i < 4 and j < 4 else 150 + 6 * i + j
    taken = set(words.values())
    words |= {f"w{i}": i for i in range(256) if i not in taken}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                        padding_side="left")
    special = [w for w in words if w.startswith("<") and w not in ("<pad>", "<unk>")]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    images = Idefics3ImageProcessor(max_image_size={"longest_edge": 56}, size={"longest_edge": 112},
                                    do_image_splitting=True)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=SEQ)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_inputs(models, family):
    """The processor's own batch (an image split 2 x 2; a text-only prompt; images split 1 x 2 and 2 x 2): every
    image's crops (``rows · cols + 1`` by the image processor) are one image of ``vtok.stats``, in ``forward`` and
    ``generate``; keep-all is the identity; each prompt alone gives the batch's tokens."""
    import numpy as np

    model = models[family]
    proc = _processor()
    rng = np.random.default_rng(0)
    imgs = [[rng.integers(0, 255, (100, 60, 3), dtype=np.uint8)], [],
            [rng.integers(0, 255, (20, 112, 3), dtype=np.uint8), rng.integers(0, 255, (112, 90, 3), dtype=np.uint8)]]
    text = ["what <image> is", "what is this", "<image> this <image> is"]
    info = proc.image_processor([i for i in imgs if i], return_row_col_info=True)
    want = [SEQ * (r * c + 1) for rows, cols in zip(info["rows"], info["cols"], strict=True)
            for r, c in zip(rows, cols, strict=True)]
    assert len(want) == 3 and len(set(want)) > 1  # the images differ in crop counts

    def call(t, i):
        out = proc(text=t, images=i if any(i) else None, return_tensors="pt", padding=True)
        return {k: v for k, v in out.items() if k != "token_type_ids"}  # 4.x's tokenizer adds them

    inp = call(text, imgs)
    assert inp["pixel_values"].shape[:2] == (3, max(want[0], want[1] + want[2]) // SEQ)  # crops, zero-padded
    with torch.no_grad():
        ref = model(**inp).logits
        with vtok.wrapped(model, "divprune", 1.0):
            assert torch.equal(model(**inp).logits, ref)
        with vtok.wrapped(model, "visionzip", 0.3):
            model(**inp)
            per = vtok.stats(model)["per_image"]
            gen = greedy(model, inp, n=8)
            per_gen = vtok.stats(model)["per_image"]
            for b in range(3):
                one = call([text[b]], [imgs[b]])
                assert greedy(model, one, n=8)[0].tolist() == gen[b].tolist()
    for p in (per, per_gen):
        assert [d["before"] for d in p] == want
        assert [d["sample"] for d in p] == [0, 2, 2]
        assert [d["after"] for d in p] == [resolve_k(0.3, w) for w in want]


def test_group_reads_images_from_the_prompt(models):
    """``group`` alone: crops up to each ``<global-img>`` run are one image (the marker inferred from the last run of
    each sample, or set on the adapter); it is idempotent, keeps the first index, and leaves records it cannot match
    to the prompt as they are."""
    from vtok.hooks.hf._runtime import ImageRecord
    from vtok.hooks.hf.tiny.idefics3 import GLOBAL

    model = models["idefics3"]
    adapter = vtok.hooks.hf.ADAPTERS["Idefics3ForConditionalGeneration"]
    ids, _ = left_pad([_sample([(1, 2), (0, 0)])[0], [4, 5], _sample([(2, 2)])[0]])
    recs = [ImageRecord(n=SEQ, image=10 + i) for i in range(9)]
    adapter.group(model, recs, ids)
    assert [r.image for r in recs] == [10] * 3 + [11] + [12] * 5
    adapter.group(model, recs, ids)
    assert [r.image for r in recs] == [10] * 3 + [11] + [12] * 5
    short = [ImageRecord(n=SEQ, image=i) for i in range(8)]
    adapter.group(model, short, ids)
    assert [r.image for r in short] == list(range(8))
    # a prompt without the <global-img> markers (other text before each run): the set marker alone closes images
    bare = ids.masked_fill(ids == GLOBAL, 9)
    recs = [ImageRecord(n=SEQ, image=i) for i in range(9)]
    adapter.group(model, recs, bare)
    assert [r.image for r in recs] == [0] * 3 + [1] + [2] * 5  # inferred: 9, the last run's marker
    adapter.global_token_id = GLOBAL
    try:
        recs = [ImageRecord(n=SEQ, image=i) for i in range(9)]
        adapter.group(model, recs, bare)
        assert [r.image for r in recs] == [0] * 3 + [0] + [1] * 5  # no marker found: sample ends close images
    finally:
        del adapter.global_token_id
