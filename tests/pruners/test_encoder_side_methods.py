"""Encoder-side image methods (issue #19): FasterVLM, VisPruner, CDPruner, PruMerge / PruMerge+, G-Prune, SCOPE.

Each method is checked against a slow reference written independently from the paper (plain Python loops over one
sample), on hand-computed small cases, and with hypothesis property tests (exact budget, ascending unique keep).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.bench.synthetic import example_context
from vtok.context import CONTEXT_KEYS, Context


def _select(name: str, tokens: torch.Tensor, k: int, **ctx):
    opts = {key: ctx.pop(key) for key in list(ctx) if key not in CONTEXT_KEYS}
    c = Context.build(tokens, ctx)
    return vtok.get_method(name).fn(tokens, k, c, **opts).validate()


def _topk_ref(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties → lowest index, ascending."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def _cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


# --- FasterVLM -------------------------------------------------------------------------------------------------

def test_fastervlm_hand_case():
    tokens = torch.randn(1, 5, 4)
    cls = torch.tensor([[0.1, 0.4, 0.05, 0.4, 0.05]])
    assert _select("fastervlm", tokens, 2, cls_attn=cls).keep.tolist() == [[1, 3]]
    assert _select("fastervlm", tokens, 3, cls_attn=cls).keep.tolist() == [[0, 1, 3]]
    # per-head attention is averaged over heads
    heads = torch.tensor([[[0.5, 0.0, 0.25], [0.25, 0.5, 0.5]]])  # means 0.375, 0.25, 0.375: tie → token 0
    assert _select("fastervlm", tokens[:, :3], 1, cls_attn=heads).keep.tolist() == [[0]]


def test_fastervlm_matches_reference_and_placement():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 30, 8, generator=g)
    cls = torch.rand(2, 4, 30, generator=g, dtype=torch.float64)
    sel = _select("fastervlm", tokens, 9, cls_attn=cls)
    for b in range(2):
        assert sel.keep[b].tolist() == _topk_ref(cls[b].mean(0).tolist(), 9)
    m = vtok.get_method("fastervlm")
    assert m.needs == {"cls_attn"} and m.placement.layer == -2 and m.placement.at == "output"


# --- VisPruner -------------------------------------------------------------------------------------------------

def _vispruner_ref(x: list[list[float]], attn: list[float], k: int, ratio: float = 0.5, per_step: int = 8):
    n = len(x)
    n_imp = int(k * ratio)
    order = sorted(range(n), key=lambda i: (-attn[i], i))
    important, residual = order[:n_imp], order[n_imp:]
    div = k - n_imp
    while div > 0 and len(residual) > div:
        a = residual[0::2]
        bb = residual[1::2]
        r = min(per_step, len(residual) - div, len(a))
        score = [max(_cos(x[i], x[j]) for j in bb) for i in a]
        ranked = sorted(range(len(a)), key=lambda p: (-score[p], p))  # most similar first; drop the first r
        residual = [a[p] for p in ranked[r:]] + bb
    chosen = important + (residual if div > 0 else [])
    return sorted(chosen)


@pytest.mark.parametrize("k,ratio,per_step", [(6, 0.5, 8), (10, 0.5, 3), (7, 0.75, 2), (5, 0.0, 4), (4, 1.0, 8),
                                              (1, 0.5, 8), (23, 0.3, 5)])
def test_vispruner_matches_loop_reference(k, ratio, per_step):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(2, 24, 6, generator=g, dtype=torch.float64)
    cls = torch.rand(2, 24, generator=g, dtype=torch.float64)
    sel = _select("vispruner", tokens, k, cls_attn=cls, important_ratio=ratio, per_step=per_step)
    for b in range(2):
        assert sel.keep[b].tolist() == _vispruner_ref(tokens[b].tolist(), cls[b].tolist(), k, ratio, per_step)


def test_vispruner_hand_case_drops_the_duplicate():
    # important: token 0 (highest attention). Residual in attention order: [1, 2, 3]; a = [1, 3], b = [2].
    # token 1 duplicates token 2 (cos 1), token 3 is orthogonal to it: one round drops token 1.
    tokens = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0], [0, 0, 1.0]]])
    cls = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    sel = _select("vispruner", tokens, 3, cls_attn=cls, important_ratio=0.34)
    assert sel.keep.tolist() == [[0, 2, 3]]
    # plain attention top-3 would keep the duplicate pair 1, 2
    assert _select("fastervlm", tokens, 3, cls_attn=cls).keep.tolist() == [[0, 1, 2]]


def test_vispruner_bad_options():
    tokens = torch.randn(1, 8, 4)
    cls = torch.rand(1, 8)
    with pytest.raises(ValueError, match="important_ratio"):
        _select("vispruner", tokens, 4, cls_attn=cls, important_ratio=1.5)
    with pytest.raises(ValueError, match="per_step"):
        _select("vispruner", tokens, 4, cls_attn=cls, per_step=0)


# --- properties (all methods of this file) --------------------------------------------------------------------

METHODS_19 = ["fastervlm", "vispruner", "cdpruner", "prumerge", "prumerge_plus", "gprune", "scope"]


@examples(25)
@given(n=st.integers(2, 40), frac=st.floats(0.0, 1.0), b=st.integers(1, 3), seed=st.integers(0, 2**16),
       name=st.sampled_from(METHODS_19))
def test_property_exact_budget(n, frac, b, seed, name):
    k = max(1, min(n, round(frac * n)))
    tokens = torch.randn(b, n, 5, generator=torch.Generator().manual_seed(seed))
    ctx = example_context(name, tokens, seed=seed)
    out, sel = vtok.compress(tokens, name, keep=k, **ctx)
    assert out.shape == (b, k, 5) and sel.keep.shape == (b, k)
    assert bool((sel.keep[:, 1:] > sel.keep[:, :-1]).all()) and torch.isfinite(out).all()


# --- CDPruner --------------------------------------------------------------------------------------------------

def _cdpruner_ref(x: torch.Tensor, q: torch.Tensor | None, k: int, sign: float = -1.0, theta=None) -> list[int]:
    """Greedy MAP by brute force: each step adds the token maximising det(L_{S ∪ {i}}) (float64, one sample)."""
    x = x.double()
    n = x.shape[0]
    xn = x / x.norm(dim=-1, keepdim=True)
    if q is None:
        r = torch.ones(n, dtype=torch.float64)
    else:
        qs = q.double().reshape(-1, x.shape[1])
        s = sign * torch.tensor([sum(_cos(x[i].tolist(), qq.tolist()) for qq in qs) / len(qs) for i in range(n)],
                                   dtype=torch.float64)
        r = (s - s.min() + 1e-6) / (s.max() - s.min())
        if theta is not None:
            r = torch.exp(theta / (2 * (1 - theta)) * r)
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    chosen: list[int] = []
    for _ in range(k):
        dets = [(float(torch.linalg.det(kernel[chosen + [i]][:, chosen + [i]])), -i) for i in range(n)
                if i not in chosen]
        chosen.append(-max(dets)[1])
    return sorted(chosen)


@pytest.mark.parametrize("k,sign,theta,qrows", [(5, "negative", None, 1), (9, "positive", None, 3),
                                                (7, "negative", 0.5, 2), (12, "positive", 0.2, 0),
                                                (1, "negative", None, 1)])
def test_cdpruner_matches_determinant_greedy(k, sign, theta, qrows):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(2, 20, 16, generator=g, dtype=torch.float64)
    query = None if qrows == 0 else torch.randn(2, qrows, 16, generator=g, dtype=torch.float64)
    ctx = {} if query is None else {"query": query}
    sel = _select("cdpruner", tokens, k, relevance_sign=sign, theta=theta, **ctx)
    for b in range(2):
        want = _cdpruner_ref(tokens[b], None if query is None else query[b], k, -1.0 if sign == "negative" else 1.0,
                             theta)
        assert sel.keep[b].tolist() == want


def test_cdpruner_hand_case_skips_duplicates_and_follows_relevance():
    # tokens 0 and 1 are duplicates, token 2 orthogonal; equal relevance (no query) → det picks 0 then 2
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert _select("cdpruner", tokens, 2).keep.tolist() == [[0, 2]]
    # a query along token 2: with the paper's positive relevance token 2 is the most relevant (r = 1 + 1e-6),
    # the code's negated relevance ranks it least relevant (r = 1e-6) and k = 1 keeps token 0
    q = torch.tensor([[0.0, 1.0]])
    assert _select("cdpruner", tokens, 1, query=q, relevance_sign="positive").keep.tolist() == [[2]]
    assert _select("cdpruner", tokens, 1, query=q, relevance_sign="negative").keep.tolist() == [[0]]
    # "auto": one representation (tokens and query share a space) → positive; with relevance_features (the
    # authors' CLIP image embeddings against CLIP text) → the code's negated relevance, measured on those features
    assert _select("cdpruner", tokens, 1, query=q).keep.tolist() == [[2]]
    rel = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])  # token 2 is now the one least like the query
    assert _select("cdpruner", tokens, 1, query=q, relevance_features=rel).keep.tolist() == [[2]]
    assert _select("cdpruner", tokens, 1, query=q, relevance_features=rel,
                   relevance_sign="positive").keep.tolist() == [[0]]


def test_cdpruner_rank_deficient_budget_is_exact():
    # N = 10 tokens in D = 2: the kernel has rank 2, the other 8 slots follow relevance
    tokens = torch.randn(1, 10, 2, generator=torch.Generator().manual_seed(0))
    q = torch.randn(1, 2, generator=torch.Generator().manual_seed(1))
    sel = _select("cdpruner", tokens, 8, query=q, relevance_sign="positive")
    assert sel.keep.shape == (1, 8) and len(set(sel.keep[0].tolist())) == 8


def test_cdpruner_bad_options():
    tokens = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="relevance_sign"):
        _select("cdpruner", tokens, 4, relevance_sign="neg")
    with pytest.raises(ValueError, match="theta"):
        _select("cdpruner", tokens, 4, theta=1.0)


# --- PruMerge / PruMerge+ --------------------------------------------------------------------------------------

def _prumerge_ref(x: torch.Tensor, keys: torch.Tensor, attn: list[float], k: int, d: int, merge: str,
                  emitted: bool = False) -> torch.Tensor:
    """One sample: top-d by attention, k − d evenly spaced among the rest, every other token to its most
    key-similar kept token; output in ascending kept position, or with ``emitted`` in the authors' order (the top-d by
    descending attention, then the others ascending)."""
    n = x.shape[0]
    top = sorted(range(n), key=lambda i: (-attn[i], i))[:d]
    rest = [i for i in range(n) if i not in top]
    extra = [rest[(j * len(rest)) // (k - d)] for j in range(k - d)] if k > d else []
    kept = sorted(top + extra)
    groups: dict[int, list[int]] = {i: [] for i in kept}
    for j in range(n):
        if j in groups:
            continue
        sims = [_cos(keys[j].tolist(), keys[i].tolist()) for i in kept]
        groups[kept[max(range(len(kept)), key=lambda p: (sims[p], -p))]].append(j)
    rows = []
    for i in kept:
        if merge == "reference":
            rows.append(x[i] + sum((attn[j] * x[j] for j in groups[i]), torch.zeros_like(x[i])))
        else:
            members = [i] + groups[i]
            rows.append(sum(attn[j] * x[j] for j in members) / sum(attn[j] for j in members))
    if emitted:
        rows = [rows[kept.index(i)] for i in top + sorted(extra)]
    return torch.stack(rows)


@pytest.mark.parametrize("name,k,share,merge", [("prumerge", 5, None, "reference"), ("prumerge", 9, None, "mean"),
                                                ("prumerge_plus", 8, 0.25, "reference"),
                                                ("prumerge_plus", 11, 0.5, "mean"), ("prumerge_plus", 3, 0.0, "mean")])
def test_prumerge_matches_loop_reference(name, k, share, merge):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(2, 24, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 24, 5, generator=g, dtype=torch.float64)
    cls = torch.softmax(torch.randn(2, 24, generator=g, dtype=torch.float64), -1)
    opts = {} if share is None else {"outlier_share": share}
    sel = _select(name, tokens, k, cls_attn=cls, keys=keys, merge=merge, **opts)
    out = sel.apply(tokens)
    pos = _select(name, tokens, k, cls_attn=cls, keys=keys, merge=merge, order="position", **opts).apply(tokens)
    d = k if share is None else int(math.floor(share * k + 0.5))
    for b in range(2):
        torch.testing.assert_close(out[b], _prumerge_ref(tokens[b], keys[b], cls[b].tolist(), k, d, merge, True))
        torch.testing.assert_close(pos[b], _prumerge_ref(tokens[b], keys[b], cls[b].tolist(), k, d, merge))


def test_prumerge_hand_case():
    # token 0 has the top attention; token 1 is key-similar to 0, token 2 to 3 (kept with k = 2)
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]]])
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    cls = torch.tensor([[0.5, 0.1, 0.15, 0.25]])
    sel = _select("prumerge", tokens, 2, cls_attn=cls, keys=keys)
    assert sel.keep.tolist() == [[0, 3]] and sel.assign.tolist() == [[0, 0, 1, 1]]
    torch.testing.assert_close(sel.apply(tokens), torch.tensor([[[1.0, 0.1], [4.3, 0.3]]]))
    mean = _select("prumerge", tokens, 2, cls_attn=cls, keys=keys, merge="mean").apply(tokens)
    torch.testing.assert_close(mean, torch.tensor([[[0.5 / 0.6, 0.1 / 0.6], [1.3 / 0.4, 0.3 / 0.4]]]))


def test_prumerge_budget_is_the_iqr_outliers():
    import numpy as np

    from vtok.pruners.prumerge import iqr_outliers, prumerge_budget

    g = torch.Generator().manual_seed(3)
    cls = torch.softmax(3 * torch.randn(2, 50, generator=g), -1)
    mask = iqr_outliers(cls)
    for b in range(2):
        a = cls[b].numpy().astype(np.float64)
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        assert mask[b].tolist() == (a > q3 + 1.5 * (q3 - q1)).tolist()
    m = prumerge_budget(cls)
    assert m.tolist() == mask.sum(1).clamp_min(1).tolist()
    for b in range(2):  # PruMerge+: the outliers plus the authors' grid {0, s, 2s, ...} < N - 1 less the outliers
        mb = int(m[b])
        stride = max(1, (50 // mb) // 3)
        grid = [p for p in range(0, 49, stride) if not mask[b, p]]
        assert int(prumerge_budget(cls, plus=True)[b]) == mb + len(grid)
    k = int(m[0])
    keep = _select("prumerge", cls[:1, :, None].expand(1, 50, 3).contiguous(), k, cls_attn=cls[:1]).keep
    assert set(keep[0].tolist()) == set(mask[0].nonzero().flatten().tolist())


def test_prumerge_bad_options():
    tokens, cls = torch.randn(1, 8, 4), torch.rand(1, 8)
    with pytest.raises(ValueError, match="merge"):
        _select("prumerge", tokens, 4, cls_attn=cls, merge="avg")
    with pytest.raises(ValueError, match="outlier_share"):
        _select("prumerge_plus", tokens, 4, cls_attn=cls, outlier_share=-0.1)
    for name in ("prumerge", "prumerge_plus"):
        with pytest.raises(ValueError, match="order"):
            _select(name, tokens, 4, cls_attn=cls, order="sorted")


# --- G-Prune ---------------------------------------------------------------------------------------------------

def _gprune_ref(x: torch.Tensor, k: int, threshold=0.5, temperature=0.03, iters=5) -> list[int]:
    """One sample, literally: masked adjacency, row softmax, matrix power, norm-weighted flow / degree."""
    x = x.double()
    n = x.shape[0]
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            c = _cos(x[i].tolist(), x[j].tolist())
            a[i, j] = c / temperature if c >= threshold else -1e9
    p = torch.softmax(a, dim=1)
    deg = torch.tensor([sum(1 for j in range(n) if a[i, j] > -1e9) for i in range(n)], dtype=torch.float64)
    s = x.norm(dim=-1)[None] @ torch.linalg.matrix_power(p, iters)
    return _topk_ref((s[0] / deg).tolist(), k)


@pytest.mark.parametrize("k,threshold,temperature,iters", [(6, 0.5, 0.03, 5), (10, 0.2, 0.1, 3), (3, 0.0, 0.5, 1),
                                                           (8, 0.3, 0.05, 0)])
def test_gprune_matches_matrix_power_reference(k, threshold, temperature, iters):
    g = torch.Generator().manual_seed(k)
    base = torch.randn(4, 6, generator=g, dtype=torch.float64)
    tokens = (base.repeat(1, 5, 1).reshape(20, 6) + 0.6 * torch.randn(20, 6, generator=g, dtype=torch.float64))
    tokens = torch.stack([tokens, tokens.flip(0) * 1.5])
    sel = _select("gprune", tokens, k, threshold=threshold, temperature=temperature, iters=iters)
    for b in range(2):
        assert sel.keep[b].tolist() == _gprune_ref(tokens[b], k, threshold, temperature, iters)


def test_gprune_hand_case():
    # tokens 0, 1 share a direction (a 2-node component), token 2 is alone. Norms 1, 3, 1.5: the pair's information
    # (1 + 3) is shared equally, 2 each, divided by degree 2 → 1; token 2 keeps 1.5 with degree 1.
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.5]]])
    assert _select("gprune", tokens, 1).keep.tolist() == [[2]]
    assert _select("gprune", tokens, 2).keep.tolist() == [[0, 2]]  # tie 0 / 1 → lowest index


def test_gprune_bad_options():
    tokens = torch.randn(1, 8, 4)
    for opts, name in [({"threshold": 1.5}, "threshold"), ({"temperature": 0}, "temperature"),
                       ({"iters": -1}, "iters")]:
        with pytest.raises(ValueError, match=name):
            _select("gprune", tokens, 4, **opts)


# --- SCOPE -----------------------------------------------------------------------------------------------------

def _scope_ref(x: torch.Tensor, sal: list[float], k: int, alpha: float = 1.0, combine: str = "multi") -> list[int]:
    """Greedy on the set function itself: coverage(S) = Σ_v max(0, max_{s∈S} cos(x_v, x_s)), gain = difference."""
    n = x.shape[0]
    sim = [[_cos(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]

    def coverage(chosen: list[int]) -> float:
        return sum(max([0.0] + [sim[v][s] for s in chosen]) for v in range(n))

    chosen: list[int] = []
    for _ in range(k):
        best, best_u = -math.inf, -1
        for u in range(n):
            if u in chosen:
                continue
            gain = coverage(chosen + [u]) - coverage(chosen)
            score = gain * max(sal[u], 0) ** alpha if combine == "multi" else gain + max(sal[u], 0) ** alpha
            if score > best + 1e-12:
                best, best_u = score, u
        chosen.append(best_u)
    return sorted(chosen)


@pytest.mark.parametrize("k,alpha,combine", [(5, 1.0, "multi"), (9, 0.5, "multi"), (4, 2.0, "add"), (1, 1.0, "add")])
def test_scope_matches_set_function_greedy(k, alpha, combine):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(2, 16, 5, generator=g, dtype=torch.float64)
    cls = torch.softmax(torch.randn(2, 16, generator=g, dtype=torch.float64), -1)
    sel = _select("scope", tokens, k, cls_attn=cls, alpha=alpha, combine=combine)
    for b in range(2):
        assert sel.keep[b].tolist() == _scope_ref(tokens[b], cls[b].tolist(), k, alpha, combine)


def test_scope_hand_case():
    # tokens 0 and 1 are duplicates, 2 orthogonal. Equal saliency: gains 2, 2, 1 → token 0; then 0, 1 → token 2.
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    assert _select("scope", tokens, 2, cls_attn=torch.full((1, 3), 1 / 3)).keep.tolist() == [[0, 2]]
    # saliency 0.1, 0.1, 0.5: scores 0.2, 0.2, 0.5 → token 2 first
    assert _select("scope", tokens, 1, cls_attn=torch.tensor([[0.1, 0.1, 0.5]])).keep.tolist() == [[2]]


def test_scope_bad_options():
    tokens, cls = torch.randn(1, 8, 4), torch.rand(1, 8)
    with pytest.raises(ValueError, match="combine"):
        _select("scope", tokens, 4, cls_attn=cls, combine="mul")
    with pytest.raises(ValueError, match="alpha"):
        _select("scope", tokens, 4, cls_attn=cls, alpha=-1)


def test_prumerge_per_head_keys_are_concatenated():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 12, 4, generator=g, dtype=torch.float64)
    heads = torch.randn(1, 3, 12, 2, generator=g, dtype=torch.float64)
    cls = torch.rand(1, 12, generator=g, dtype=torch.float64)
    flat = heads.permute(0, 2, 1, 3).reshape(1, 12, 6)
    a = _select("prumerge", tokens, 4, cls_attn=cls, keys=heads)
    b = _select("prumerge", tokens, 4, cls_attn=cls, keys=flat)
    assert torch.equal(a.assign, b.assign)


@pytest.mark.parametrize("method", ["cdpruner", "scope", "gprune", "vispruner"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bounded_memory_path_equals_the_cached_matrix(method, dtype, monkeypatch):
    """Above ``GRAM_MAX_ELEMENTS`` (lowered here) these methods stop keeping one sample's N x N similarity (CDPruner:
    one [N, D] x [D] product per greedy step; SCOPE / G-Prune: row blocks recomputed on demand; VisPruner: each
    round in column blocks): the same picks as with the cached matrix."""
    from vtok.kernels import reference as ref

    info = vtok.get_method(method)
    for n, seed in ((17, 0), (300, 1), (577, 2)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, n, 32, generator=g)
        x[:, ::3] += 2 * torch.randn(2, 1, 32, generator=g)
        x = x.to(dtype)
        ctx = {k: v for k, v in example_context(method, x, seed=1).items() if k in info.needs | info.uses}
        for keep in (0.1, 0.25, 0.5):
            a = vtok.compress(x, method, keep=keep, **ctx)[1].keep
            with monkeypatch.context() as m:
                m.setattr(ref, "GRAM_MAX_ELEMENTS", 16)
                b = vtok.compress(x, method, keep=keep, **ctx)[1].keep
            assert torch.equal(a, b), (n, keep)
