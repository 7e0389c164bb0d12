"""Fidelity of PruMerge / PruMerge+ (arXiv 2403.15388) to the authors' code, written out here from its arithmetic as
plain loops (our own code, never theirs).

The authors' code: 42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
``token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus`` with ``if_adaptive=True``
(PruMerge+, what its newest ``forward`` calls), for one image of ``N = 576`` patch tokens:

* ``m`` outliers: ``a > Q3 + 1.5 · IQR`` with numpy's (linear) percentiles of the [CLS] attention ``a``;
  ``reduction_ratio = m / N`` and ``torch.topk(a, int(N · reduction_ratio))`` — sorted, so by descending attention;
* PruMerge+: ``step_length = int(1 / reduction_ratio)``, positions ``arange(0, 575, int(step_length / 3))`` that are
  not outliers, ascending, appended after the outliers;
* the tower returns ``[kept tokens in that order, one extra token]``; ``encode_images`` projects them without
  sorting, and ``prepare_inputs_labels_for_multimodal`` gives the new sequence position ids ``0, 1, 2, …``.

Inputs are CLIP-like: the [CLS] row is a softmax over 577 tokens (CLS included) of Gaussian logits whose scale is drawn
per seed (5 to 50 outliers of 576), keys and tokens random; 100 seeds per check, float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtok
from tests.helpers.hf_tiny import _one_thread  # noqa: F401  (one intra-op thread for the tiny LLaVA)
from vtok.pruners.prumerge import prumerge_budget

N = 576
SEEDS = range(100)


def clip_like(seed: int, d: int = 16, dk: int = 8):
    """``(tokens [1, N, d], keys [1, N, dk], cls_attn [1, N])`` float64: the [CLS] softmax row over 577 tokens, CLS
    column dropped, logits ``σ · randn`` with ``σ`` in ``[0.3, 1.2]``."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.3 + 0.9 * torch.rand(1, generator=g, dtype=torch.float64).item()
    attn = torch.softmax(sigma * torch.randn(1, N + 1, generator=g, dtype=torch.float64), -1)[:, 1:]
    tokens = torch.randn(1, N, d, generator=g, dtype=torch.float64)
    keys = torch.randn(1, N, dk, generator=g, dtype=torch.float64)
    return tokens, keys, attn


def authors_outliers(a: list[float]) -> list[int]:
    """Their ``outlier_dectection`` + ``topk``: the IQR outliers, by descending attention (``sorted=True``)."""
    q1, q3 = np.percentile(np.array(a), 25), np.percentile(np.array(a), 75)
    upper = q3 + 1.5 * (q3 - q1)
    m = 0
    for v in a:
        if v > upper:
            m += 1
    ratio = m / len(a)
    count = int(len(a) * ratio)  # their int(N * reduction_ratio)
    return sorted(range(len(a)), key=lambda i: (-a[i], i))[:count]


def authors_plus(a: list[float]) -> list[int]:
    """Their PruMerge+ token list: the outliers by descending attention, then the uniform positions ascending."""
    top = authors_outliers(a)
    ratio = len(top) / len(a)
    step_length = int(1 / ratio)
    stride = int(step_length / 3)
    uniform = []
    x = 0
    while x < 575:  # their arange(0, 575, stride): 575 = N - 1 at N = 576
        if x not in top:
            uniform.append(x)
        x += stride
    return top + uniform


# ---------------------------------------------------------------------------------------------------- point 1: order

def test_issue_repro_emits_by_descending_attention():
    x, k = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    a = torch.tensor([[.05, .3, .05, .4, .1, .1]])
    assert vtok.compress(x, "prumerge", 2, cls_attn=a, keys=k)[1].emitted_keep().tolist() == [[3, 1]]
    assert vtok.compress(x, "prumerge", 2, cls_attn=a, keys=k, order="position")[1].emitted_keep().tolist() == [[1, 3]]


def test_prumerge_emission_equals_authors_order():
    """At their count (``k = m``), vtok's tokens come out in the order their ``topk`` passes them to the LLM."""
    for seed in SEEDS:
        tokens, keys, attn = clip_like(seed)
        want = authors_outliers(attn[0].tolist())
        assert int(prumerge_budget(attn)[0]) == len(want)
        _, sel = vtok.compress(tokens, "prumerge", len(want), cls_attn=attn, keys=keys)
        assert sel.emitted_keep()[0].tolist() == want, seed


def test_prumerge_plus_tokens_and_order_equal_authors():
    """At their count, PruMerge+ keeps exactly their tokens (outliers + uniform grid less the outliers) and emits
    them in their order: ``[outliers by descending attention, uniform ascending]``."""
    for seed in SEEDS:
        tokens, keys, attn = clip_like(seed)
        want = authors_plus(attn[0].tolist())
        k = int(prumerge_budget(attn, plus=True)[0])
        assert k == len(want), seed
        _, sel = vtok.compress(tokens, "prumerge_plus", k, cls_attn=attn, keys=keys)
        assert sel.emitted_keep()[0].tolist() == want, seed


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_order_option_only_permutes_the_output(name):
    """``order="position"`` is the same selection and the same merged values, in ascending positions."""
    for seed in range(10):
        tokens, keys, attn = clip_like(seed)
        k = int(prumerge_budget(attn, plus=name == "prumerge_plus")[0])
        out, sel = vtok.compress(tokens, name, k, cls_attn=attn, keys=keys)
        pos, psel = vtok.compress(tokens, name, k, cls_attn=attn, keys=keys, order="position")
        assert torch.equal(sel.keep, psel.keep) and torch.equal(sel.assign, psel.assign)
        assert psel.order is None and psel.emitted_keep().tolist() == [sorted(sel.emitted_keep()[0].tolist())]
        where = {p: j for j, p in enumerate(psel.keep[0].tolist())}
        torch.testing.assert_close(out[0], pos[0, [where[p] for p in sel.emitted_keep()[0].tolist()]],
                                   rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- point 4: count

def test_prumerge_plus_budget_equals_authors_count():
    """``prumerge_budget(plus=True)`` = ``m + |{0, s, 2s, …} < 575 \\ outliers|``, ``s = int(int(N / m) / 3)``, for a
    batch of 100 images at once."""
    attn = torch.cat([clip_like(seed)[2] for seed in SEEDS])
    want = [len(authors_plus(row.tolist())) for row in attn]
    assert prumerge_budget(attn, plus=True).tolist() == want
    assert prumerge_budget(attn).tolist() == [len(authors_outliers(row.tolist())) for row in attn]
    assert len(set(want)) > 10  # the inputs span many counts


def test_prumerge_plus_other_budgets_keep_outliers_first_and_thin_or_fill_the_grid():
    """Away from their count the budget stays exact: the ``min(m, k)`` outliers first, then a subset of their grid
    (smaller ``k``) or all of it plus other tokens (larger ``k``), ascending."""
    for seed in range(20):
        tokens, keys, attn = clip_like(seed)
        theirs = authors_plus(attn[0].tolist())
        m = int(prumerge_budget(attn)[0])
        top, grid = theirs[:m], set(theirs[m:])
        for k in (max(1, m // 2), m + (len(theirs) - m) // 2, len(theirs) + 40):
            _, sel = vtok.compress(tokens, "prumerge_plus", k, cls_attn=attn, keys=keys)
            got = sel.emitted_keep()[0].tolist()
            assert len(got) == len(set(got)) == k
            d = min(m, k)
            assert got[:d] == top[:d]
            rest = got[d:]
            assert rest == sorted(rest)
            if k <= len(theirs):
                assert set(rest) <= grid
            else:
                assert grid <= set(rest)


def test_prumerge_plus_outlier_share_keeps_the_fixed_split():
    tokens, keys, attn = clip_like(0)
    _, sel = vtok.compress(tokens, "prumerge_plus", 40, cls_attn=attn, keys=keys, outlier_share=0.25)
    got = sel.emitted_keep()[0].tolist()
    order = sorted(range(N), key=lambda i: (-attn[0, i].item(), i))
    assert got[:10] == order[:10]
    rest = [i for i in range(N) if i not in order[:10]]
    assert got[10:] == [rest[(j * len(rest)) // 30] for j in range(30)]


# ---------------------------------------------------------------------------------------------- wrapper on LLaVA

@pytest.fixture(scope="module")
def llava():
    pytest.importorskip("transformers")
    from vtok.hooks.hf.tiny import tiny_model

    return tiny_model("llava")


def _outlier_count(a: list[float]) -> int:
    return max(1, len(authors_outliers(a)))


def _reference(model, inputs, name: str, k: int):
    """Batch 1: ``(inputs_embeds [1, L', D], position_ids [1, L'])`` as the authors' LLaVA builds them: each image's
    kept tokens in their emission order — the ``d = min(m, k)`` highest [CLS] attention first, descending, then the
    rest ascending — in place of its placeholders, position ids ``0 … L' − 1``."""
    from tests.hf.test_hf_wrap import _image_features, _vision_context
    from vtok.hooks.hf.tiny import IMAGE_TOKEN

    ids, pix = inputs["input_ids"], inputs["pixel_values"]
    feats = _image_features(model, pix)
    cls_attn, keys = _vision_context(model, pix)
    emb = model.model.language_model.get_input_embeddings()(ids[0])
    rows, i, seen, n = [], 0, 0, feats[0].shape[0]
    while i < ids.shape[1]:
        if ids[0, i] != IMAGE_TOKEN:
            rows.append(emb[i])
            i += 1
            continue
        a = cls_attn[seen].tolist()
        # vtok's merged values (checked elsewhere), by the position each takes; the order is built here
        out, sel = vtok.compress(feats[seen][None], name, k, cls_attn=cls_attn[seen:seen + 1],
                                 keys=keys[seen:seen + 1])
        values = dict(zip(sel.emitted_keep()[0].tolist(), out[0], strict=True))
        d = min(k, _outlier_count(a)) if name == "prumerge_plus" else k
        first = sorted(values, key=lambda p: (-a[p], p))[:d]
        emitted = first + sorted(p for p in values if p not in first)
        rows.extend(values[p] for p in emitted)
        i += n
        seen += 1
    return torch.stack(rows)[None], torch.arange(len(rows))[None]


@pytest.mark.parametrize("name,k", [("prumerge", 6), ("prumerge_plus", 7)])
def test_wrapped_llava_feeds_the_authors_order_with_fresh_positions(llava, name, k):
    from tests.hf.test_hf_wrap import _lm_logits
    from vtok.hooks.hf.tiny import tiny_inputs

    assert vtok.get_method(name).placement.positions == "reindex"
    inputs = tiny_inputs(llava, [2], seed=3)
    with torch.no_grad():
        x, p = _reference(llava, inputs, name, k)
        ref = _lm_logits(llava, x, p)
        toks = []
        for _ in range(6):
            nxt = _lm_logits(llava, x, p)[0, -1].argmax()
            toks.append(int(nxt))
            x = torch.cat([x, llava.model.language_model.get_input_embeddings()(nxt)[None, None]], 1)
            p = torch.cat([p, p[:, -1:] + 1], 1)
        with vtok.wrapped(llava, name, k):
            out = llava(**inputs).logits
            gen = llava.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4
    assert gen[0].tolist() == toks
