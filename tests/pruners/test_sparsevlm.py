"""SparseVLM: raters and scores by hand, the budget arithmetic, and the whole stage against a plain-loop reference
written from the authors' code (``attn_postprocess_topk`` + recycling + ``cluster_and_merge``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.pruners.sparsevlm import rater_scores, sparsevlm_budget, text_relevance


def _run(tokens, k, att, rel, **opts):
    m = vtok.get_method("sparsevlm")
    ctx = vtok.Context.build(tokens, {"text_rows_attn": att, "text_relevance": rel})
    return m.fn(tokens, k, ctx, **opts)


def test_relevance_by_hand():
    rel = text_relevance(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    e = math.e
    assert torch.allclose(rel, torch.tensor([(e / (e + 1) + 0.5) / 2, (1 / (e + 1) + 0.5) / 2]))
    assert text_relevance(torch.ones(3, 2), torch.ones(0, 2)).shape == (0,)
    with pytest.raises(ValueError, match="same D"):
        text_relevance(torch.ones(3, 2), torch.ones(4, 3))


def test_raters_and_scores_by_hand():
    # relevance mean 1/3: raters are text tokens 1 and 2; row 0 (not a rater) would make token 0 the best
    rel = torch.tensor([[0.1, 0.5, 0.4]])
    att = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.1, 0.3], [0.0, 0.4, 0.3, 0.3]]])
    assert torch.allclose(rater_scores(att, rel), torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    # no rater (all equal): every row counts; no text at all: zeros
    assert torch.allclose(rater_scores(att, torch.full((1, 3), 1 / 3)), att.mean(1))
    assert torch.equal(rater_scores(torch.zeros(1, 0, 4), torch.zeros(1, 0)), torch.zeros(1, 4))
    tokens = torch.arange(8.0).reshape(1, 4, 2)
    assert _run(tokens, 2, att, rel, recycle=False).keep.tolist() == [[1, 3]]
    # with recycling k = 2 is 1 kept (token 1) + 1 cluster: the best deleted token (3) alone, after the kept one
    sel = _run(tokens, 2, att, rel)
    assert sel.emitted_keep().tolist() == [[1, 3]]
    assert torch.equal(sel.apply(tokens), tokens[:, [1, 3]])


def test_budget_arithmetic():
    # LLaVA-1.5's "192 tokens" schedule of the authors' code: keep 300 / 200 / 110 after layers 2 / 6 / 15
    assert sparsevlm_budget(576, 300) == 309  # 276 deleted: 83 recycled into 9 clusters
    assert sparsevlm_budget(309, 200) == 204
    assert sparsevlm_budget(204, 110) == 113
    assert sparsevlm_budget(576, 0) == 18 and sparsevlm_budget(576, 576) == 576
    with pytest.raises(ValueError, match="kept"):
        sparsevlm_budget(10, 11)
    tokens = torch.randn(1, 576, 4)
    ctx = {"text_rows_attn": torch.rand(1, 3, 576), "text_relevance": torch.rand(1, 3)}
    with pytest.raises(ValueError, match="k=17"):
        vtok.compress(tokens, "sparsevlm", 17, **ctx)
    assert vtok.compress(tokens, "sparsevlm", 17, recycle=False, **ctx)[0].shape == (1, 17, 4)
    for bad in ({"recycle": 1}, {"recycle_ratio": 1.5}, {"cluster_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vtok.compress(tokens, "sparsevlm", 100, **ctx, **bad)


@examples(200)
@given(st.integers(1, 700), st.data())
def test_every_budget_from_the_minimum_is_exact(n, data):
    lo = sparsevlm_budget(n, 0)
    k = data.draw(st.integers(lo, n))
    kept = max(j for j in range(k + 1) if sparsevlm_budget(n, j) == k)  # reachable, and the most kept tokens
    assert sparsevlm_budget(n, kept) == k


def _reference(x, att, rel, kept, ratio=0.3, per=10):
    """The authors' stage on one sample, in plain loops (float64): ``[kept tokens by position] + [cluster means in
    descending centre score]``, and the position each output takes."""
    n, d = len(x), len(x[0])
    raters = [t for t in range(len(rel)) if rel[t] > sum(rel) / len(rel)] or list(range(len(rel)))
    score = [sum(att[t][j] for t in raters) / len(raters) for j in range(n)]
    order = sorted(range(n), key=lambda j: (-score[j], j))
    keep = sorted(order[:kept])
    m = n - kept
    if m == 0:
        return [x[j] for j in keep], keep
    r = min(int(ratio * m) + 1, m)
    rec = order[kept:kept + r]  # top-r of the deleted, best first
    c = int(r / per) + 1
    dist = [[math.dist(x[a], x[b]) / math.sqrt(d) for b in rec] for a in rec]
    dens = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]
    dmax = max(max(row) for row in dist)
    # j is denser than i; equal densities (mutual nearest neighbours tie whenever c = 2) → the earlier, better-scored
    # token counts as denser (vtok's rule; the authors' rand · 1e-6 picks one at random)
    def denser(j, i):
        return dens[j] > dens[i] + 1e-12 or (abs(dens[j] - dens[i]) <= 1e-12 and j < i)

    delta = [min([dist[i][j] for j in range(r) if denser(j, i)], default=dmax) for i in range(r)]
    centres = sorted(range(r), key=lambda i: (-(delta[i] * dens[i]), i))[:c]
    label = [min(range(c), key=lambda q: (dist[i][centres[q]], q)) for i in range(r)]
    for q, ci in enumerate(centres):
        label[ci] = q
    merged = []
    for q in range(c):
        members = [x[rec[i]] for i in range(r) if label[i] == q]
        merged.append([sum(v[t] for v in members) / len(members) for t in range(d)])
    return [x[j] for j in keep] + merged, keep + [rec[ci] for ci in centres]


@examples(60)
@given(st.integers(0, 10_000), st.integers(2, 60), st.integers(1, 6), st.data())
def test_stage_equals_the_reference(seed, n, t, data):
    g = torch.Generator().manual_seed(seed)
    b, d = 2, 5
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    att = torch.rand(b, t, n, generator=g, dtype=torch.float64).softmax(-1)
    rel = torch.rand(b, t, generator=g, dtype=torch.float64)
    k = data.draw(st.integers(sparsevlm_budget(n, 0), n))
    sel = _run(x, k, att, rel)
    out = sel.apply(x)
    for i in range(b):
        kept = max(j for j in range(k + 1) if sparsevlm_budget(n, j) == k)
        want, pos = _reference(x[i].tolist(), att[i].tolist(), rel[i].tolist(), kept)
        if kept == n - 1 or k == n:  # nothing or one token deleted: vtok returns the identity at k == n
            continue
        assert sel.emitted_keep()[i].tolist() == pos
        assert torch.allclose(out[i], torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_batch_one_by_one_and_determinism():
    g = torch.Generator().manual_seed(3)
    x, att, rel = torch.randn(3, 50, 8, generator=g), torch.rand(3, 4, 50, generator=g), torch.rand(3, 4, generator=g)
    sel = _run(x, 20, att, rel)
    out = sel.apply(x)
    assert torch.equal(out, _run(x, 20, att, rel).apply(x))
    for i in range(3):
        one = _run(x[i:i + 1], 20, att[i:i + 1], rel[i:i + 1])
        assert torch.equal(one.emitted_keep(), sel.emitted_keep()[i:i + 1])
        assert torch.allclose(one.apply(x[i:i + 1]), out[i:i + 1])


def test_registry_row():
    m = vtok.get_method("sparsevlm")
    assert m.family == "attention" and m.merges and m.placement.positions == "original"
    assert m.needs == {"text_rows_attn", "text_relevance"}
    assert m.options == {"recycle": True, "recycle_ratio": 0.3, "cluster_size": 10}
    assert "2410.04417" in m.paper
