import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from tests.helpers.memtools import max_alloc_bytes, nxn_bytes
from vtok.context import Context
from vtok.kernels import reference as R

METHODS = ["divprune", "todre"]


def _angles(*deg):
    """Unit vectors in 2-D at the given angles (degrees): ``[1, N, 2]``."""
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg])[None]


def _naive_divprune(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune greedy max–min with plain Python loops (cosine distance, ties → lowest index)."""
    v = x.double().tolist()
    n = len(v)

    def dist(i, j):
        dot = sum(a * b for a, b in zip(v[i], v[j], strict=True))
        ni = math.sqrt(sum(a * a for a in v[i]))
        nj = math.sqrt(sum(a * a for a in v[j]))
        return 1.0 - dot / (ni * nj)

    nearest = [min(dist(i, j) for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(dist(i, j) for j in chosen), -i)))
    return sorted(chosen)


# ------------------------------------------------------------------------------------------- hand-computed


def test_divprune_hand_computed():
    # unit vectors at 0,1,2 | 120,121 | 240,241 degrees and one lone vector at 60 degrees.
    x = _angles(0, 1, 2, 120, 121, 240, 241, 60)
    picks = {k: vtok.compress(x, "divprune", keep=k)[1].keep[0].tolist() for k in (1, 2, 3, 4)}
    assert picks[1] == [7]  # the most isolated token (nearest neighbour 58 deg away) starts
    assert picks[2] == [5, 7]  # 240 deg is exactly opposite 60 deg (241 is 179 deg away)
    assert picks[3] == [4, 5, 7]  # 121 deg: 61 deg from 60, beats 0 and 120 deg (60 deg from 60)
    assert picks[4] == [0, 4, 5, 7]  # 0 deg: 60 deg from the set; 1 and 2 deg are closer


def test_todre_hand_computed_start_and_groups():
    # three tight groups along e1 (0, 3, 5), e2 (1, 4) and e3 (2, 6); one pick per group at k=3
    base = torch.eye(3)
    groups = [0, 1, 2, 0, 1, 0, 2]
    jitter = torch.tensor([[0, .01, 0], [.01, 0, 0], [0, 0, 0], [0, 0, .02], [0, 0, .01], [0, .02, 0], [.02, 0, 0]])
    x = (base[groups] + jitter)[None]
    for version in ("v2", "v1"):
        _, sel = vtok.compress(x, "todre", keep=3, version=version)
        assert sorted(groups[i] for i in sel.keep[0].tolist()) == [0, 1, 2]
    for j in range(7):
        one_hot = torch.zeros(1, 7)
        one_hot[0, j] = 1.0
        # v2 (default): the [CLS] attention chooses the pivot; v1: the relevance signal chooses the first center.
        # Either way the chosen token is always kept and each group still gets one pick
        for version, key in (("v2", "cls_attn"), ("v1", "text_attn")):
            _, s = vtok.compress(x, "todre", keep=3, version=version, **{key: one_hot})
            assert j in s.keep[0].tolist()
            assert sorted(groups[i] for i in s.keep[0].tolist()) == [0, 1, 2]
    # without cls_attn / relevance, k=1 keeps the most central token: the largest group (e1) holds it
    for version in ("v2", "v1"):
        _, s1 = vtok.compress(x, "todre", keep=1, version=version)
        assert groups[s1.keep[0, 0]] == 0


def test_todre_candidates_filter_by_relevance():
    x = _angles(0, 90, 180, 270, 45, 135)
    rel = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.0, 0.0]])
    # k-center from the most relevant token (180) over 4 candidates: 180, 0, then 90 and 270 (ties -> lowest index
    # picks 90 first); the 2 most relevant candidates are 180 and 270
    _, s = vtok.compress(x, "todre", keep=2, text_attn=rel, candidates=2.0, version="v1")
    assert s.keep[0].tolist() == [2, 3]
    _, s = vtok.compress(x, "todre", keep=2, text_attn=rel, version="v1")
    assert s.keep[0].tolist() == [0, 2]  # pure k-center from 180: the opposite token
    # v2 from the same start: max-sum also takes the opposite token (cumulative cos -1) second
    _, s = vtok.compress(x, "todre", keep=2, text_attn=rel, start="relevance")
    assert s.keep[0].tolist() == [0, 2]
    # query embedding as the relevance source: most similar token is 45 deg
    q = torch.tensor([[math.cos(math.radians(40)), math.sin(math.radians(40))]])
    _, s = vtok.compress(x, "todre", keep=1, query=q, version="v1")
    assert s.keep[0].tolist() == [4]
    _, s = vtok.compress(x, "todre", keep=1, query=q, start="relevance")
    assert s.keep[0].tolist() == [4]


# --------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_exact_identity(method, tokens4):
    fn = vtok.get_method(method).fn
    s = fn(tokens4, 24, Context.build(tokens4, {})).validate()
    assert torch.equal(s.keep, torch.arange(24).expand(4, 24))
    assert s.assign is None and torch.equal(s.apply(tokens4), tokens4)
    out, _ = vtok.compress(tokens4, method, keep=1.0)
    assert torch.equal(out, tokens4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [1, 2, 5, 12, 23, 0.5, 0.25])
def test_exact_budget_sorted_unique_gather(method, keep, tokens4):
    out, sel = vtok.compress(tokens4, method, keep=keep)
    k = vtok.resolve_k(keep, 24)
    assert out.shape == (4, k, 8) and sel.keep.shape == (4, k) and sel.assign is None
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    for b in range(4):
        assert torch.equal(out[b], tokens4[b, sel.keep[b]])


@pytest.mark.parametrize("method", METHODS)
def test_batch_matches_one_by_one_and_deterministic(method, tokens4):
    rel = torch.rand(4, 3, 24, generator=torch.Generator().manual_seed(1))
    for ctx in ({}, {"text_attn": rel}):
        out, sel = vtok.compress(tokens4, method, keep=7, **ctx)
        out2, sel2 = vtok.compress(tokens4, method, keep=7, **ctx)
        assert torch.equal(sel.keep, sel2.keep) and torch.equal(out, out2)
        for b in range(4):
            one = {key: v[b:b + 1] for key, v in ctx.items()}
            single, s = vtok.compress(tokens4[b:b + 1], method, keep=7, **one)
            assert torch.equal(s.keep, sel.keep[b:b + 1]) and torch.equal(single, out[b:b + 1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_divprune_matches_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 30, 6, generator=g)
    for k in (1, 4, 11, 29):
        _, sel = vtok.compress(x, "divprune", keep=k)
        for b in range(3):
            assert sel.keep[b].tolist() == _naive_divprune(x[b], k)


def test_divprune_greedy_min_distance_beats_random():
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(5))
    xn = torch.nn.functional.normalize(x[0], dim=-1)

    def min_dist(idx):
        d = 1 - xn[idx] @ xn[idx].T
        return (d + 10 * torch.eye(len(idx))).min()

    _, sel = vtok.compress(x, "divprune", keep=8)
    rand = [min_dist(torch.randperm(64, generator=torch.Generator().manual_seed(s))[:8]) for s in range(20)]
    assert min_dist(sel.keep[0]) > max(rand)


def test_todre_relevance_shapes_agree():
    x = torch.randn(2, 20, 5, generator=torch.Generator().manual_seed(3))
    a = torch.rand(2, 4, 3, 20, generator=torch.Generator().manual_seed(4))
    _, s4 = vtok.compress(x, "todre", keep=6, text_attn=a, candidates=1.5)
    _, s3 = vtok.compress(x, "todre", keep=6, text_attn=a.mean(1), candidates=1.5)
    _, s2 = vtok.compress(x, "todre", keep=6, text_attn=a.mean((1, 2)), candidates=1.5)
    assert torch.equal(s4.keep, s3.keep) and torch.equal(s3.keep, s2.keep)


# ----------------------------------------------------------------------------------------------- errors


def test_errors(tokens4):
    with pytest.raises(ValueError, match="start"):
        vtok.compress(tokens4, "todre", keep=4, start="middle")
    with pytest.raises(ValueError, match="start='relevance' needs"):
        vtok.compress(tokens4, "todre", keep=4, start="relevance")
    with pytest.raises(ValueError, match="start='cls' needs context 'cls_attn'"):
        vtok.compress(tokens4, "todre", keep=4, start="cls")
    for bad in ("v3", "V2", 2, None):
        with pytest.raises(ValueError, match="version"):
            vtok.compress(tokens4, "todre", keep=4, version=bad)
    for bad in (0.5, 0, "2", True, float("nan")):
        with pytest.raises(ValueError, match="candidates"):
            vtok.compress(tokens4, "todre", keep=4, candidates=bad)
    with pytest.raises(ValueError, match="text_attn"):
        vtok.compress(tokens4, "todre", keep=4, text_attn=torch.rand(4, 23))
    with pytest.raises(ValueError, match="query"):
        vtok.compress(tokens4, "todre", keep=4, query=torch.rand(4, 7))
    with pytest.raises(ValueError, match="cls_attn"):
        vtok.compress(tokens4, "todre", keep=4, cls_attn=torch.rand(4, 23))
    with pytest.raises(TypeError, match="unknown option"):
        vtok.compress(tokens4, "divprune", keep=4, seed=0)


# ------------------------------------------------------------------------------------------- properties


@examples(40)
@given(n=st.integers(1, 48), b=st.integers(1, 3), r=st.floats(0.01, 1.0), method=st.sampled_from(METHODS),
       seed=st.integers(0, 2**16))
def test_property_shapes_and_budget(n, b, r, method, seed):
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))
    out, sel = vtok.compress(x, method, keep=r)
    k = vtok.resolve_k(r, n)
    assert out.shape == (b, k, 3) and sel.keep.shape == (b, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert ((sel.keep >= 0) & (sel.keep < n)).all()


def test_duplicates_still_give_k_unique_tokens():
    x = torch.ones(2, 10, 4)
    for method in METHODS:
        _, sel = vtok.compress(x, method, keep=6)
        assert sel.keep.shape == (2, 6) and (sel.keep[:, 1:] > sel.keep[:, :-1]).all()


@pytest.mark.parametrize("method", METHODS)
def test_no_nxn_allocation_above_the_matrix_limit(method, monkeypatch):
    # above reference.GRAM_MAX_ELEMENTS (lowered here) the greedy streams: no N × N matrix
    b, n = 1, 2048
    monkeypatch.setattr(R, "GRAM_MAX_ELEMENTS", n * n - 1)
    x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(0))
    q = torch.randn(b, 16)
    ctx = {"query": q, "candidates": 2.0} if method == "todre" else {}
    peak = max_alloc_bytes(lambda: vtok.compress(x, method, keep=32, **ctx))
    assert peak < nxn_bytes(b, n) / 4


@pytest.mark.parametrize("method", METHODS)
def test_one_nxn_matrix_below_the_limit(method):
    # below it: one N × N matrix per group of samples (the cosine Gram / distance matrix), never more
    b, n = 3, 1024
    x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(0))
    ctx = {"query": torch.randn(b, 16), "candidates": 2.0} if method == "todre" else {}
    peak = max_alloc_bytes(lambda: vtok.compress(x, method, keep=32, **ctx))
    assert nxn_bytes(b, n) <= peak <= nxn_bytes(b, n)
    assert b * n * n <= R.GRAM_MAX_ELEMENTS
