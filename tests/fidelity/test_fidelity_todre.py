"""ToDRE fidelity: both paper versions against plain-loop float64 references, and hand-computed cases.

* v2 (default; arXiv 2505.18757 v2, Sec. 4.1, Eqs. 3–6, Appendix Algorithm 1): pivot = argmax of the [CLS]
  attention, then greedy max-sum diversification (add the token with the smallest cumulative cosine similarity to
  the chosen set).
* v1 (arXiv 2505.18757 v1): greedy k-center (farthest point, cosine distance ``1 - cos``).
"""

import math

import pytest
import torch

import vtok
from vtok.bench.synthetic import example_context

# ------------------------------------------------------------------------------------------ plain references


def _rows(t: torch.Tensor | None, b: int):
    return None if t is None else t[b].double().tolist()


def _dot(u, v):
    return sum(a * c for a, c in zip(u, v, strict=True))


def _unit(u):
    norm = math.sqrt(_dot(u, u))
    return [a / norm for a in u] if norm > 0 else [0.0 for _ in u]


def _argmax(values):
    """Index of the largest value, ties → lowest index."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _argmin(values):
    best = 0
    for i, v in enumerate(values):
        if v < values[best]:
            best = i
    return best


def _mean_rows(x):
    """Mean over every leading axis of a nested list whose last axis is N."""
    if not isinstance(x[0], list):
        return list(x)
    rows = [_mean_rows(r) for r in x]
    return [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]


def _ref_todre(v, k, *, version="v2", start="auto", candidates=1.0, cls_attn=None, text_attn=None, query=None):
    """One sample: ``v`` [N][D] floats; context rows as nested lists. Returns the kept indices, ascending."""
    n = len(v)
    if k >= n:
        return list(range(n))
    u = [_unit(r) for r in v]
    cos = [[_dot(u[i], u[j]) for j in range(n)] for i in range(n)]
    relevance = None
    if text_attn is not None:
        relevance = _mean_rows(text_attn)
    elif query is not None:
        qs = query if isinstance(query[0], list) else [query]
        qu = [_unit(q) for q in qs]
        relevance = [sum(_dot(u[i], q) for q in qu) / len(qu) for i in range(n)]
    if start == "auto":
        if version == "v2":
            start = "cls" if cls_attn is not None else "central"
        else:
            start = "relevance" if relevance is not None else "central"
    if start == "cls":
        first = _argmax(_mean_rows(cls_attn))
    elif start == "relevance":
        first = _argmax(relevance)
    else:
        mean = [sum(r[d] for r in u) / n for d in range(len(u[0]))]
        first = _argmax([_dot(r, mean) for r in u])
    m = max(k, min(n, math.ceil(candidates * k - 1e-9)))
    chosen = [first]
    while len(chosen) < m:
        rest = [i for i in range(n) if i not in chosen]
        if version == "v2":  # Eq. 4: smallest cumulative cosine similarity to the chosen set
            scores = [sum(cos[i][c] for c in chosen) for i in rest]
            chosen.append(rest[_argmin(scores)])
        else:  # k-center: largest distance to the nearest chosen token
            scores = [min(1.0 - cos[i][c] for c in chosen) for i in rest]
            chosen.append(rest[_argmax(scores)])
    if m > k and relevance is not None:
        order = sorted(range(m), key=lambda j: (-relevance[chosen[j]], j))[:k]
        chosen = [chosen[j] for j in order]
    else:
        chosen = chosen[:k]
    return sorted(chosen)


def _check_against_reference(x, k, ctx, **options):
    _, sel = vtok.compress(x, "todre", keep=k, **ctx, **options)
    for b in range(x.shape[0]):
        want = _ref_todre(x[b].double().tolist(), k, **options,
                          **{key: _rows(ctx.get(key), b) for key in ("cls_attn", "text_attn", "query")})
        assert sel.keep[b].tolist() == want, f"sample {b}, k={k}, options {options}, context {sorted(ctx)}"


# ------------------------------------------------------------------------------------ equality on random inputs


def _random_context(b, n, d, seed, dtype):
    g = torch.Generator().manual_seed(seed + 1000)
    return {
        "cls": {"cls_attn": torch.rand(b, n, generator=g, dtype=dtype)},
        "cls_heads": {"cls_attn": torch.rand(b, 4, n, generator=g, dtype=dtype)},
        "text": {"text_attn": torch.rand(b, 3, n, generator=g, dtype=dtype)},
        "query": {"query": torch.randn(b, 2, d, generator=g, dtype=dtype)},
        "all": {"cls_attn": torch.rand(b, n, generator=g, dtype=dtype),
                "text_attn": torch.rand(b, 2, 3, n, generator=g, dtype=dtype)},
        "none": {},
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_loops_on_random_inputs(seed, version, dtype):
    b, n, d = 3, 26, 6
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    for name, ctx in _random_context(b, n, d, seed, dtype).items():
        for k in (1, 2, 7, 25, 26):
            _check_against_reference(x, k, ctx, version=version)
        if name in ("text", "query", "all"):  # the relevance-filtered candidates (a vtok extension)
            _check_against_reference(x, 6, ctx, version=version, candidates=2.0)
            _check_against_reference(x, 5, ctx, version=version, candidates=1.5)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_matches_plain_loops_for_every_start(version):
    b, n, d = 4, 20, 5
    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ctx = _random_context(b, n, d, 7, torch.float64)["all"]
    for start in ("auto", "cls", "relevance", "central"):
        for k in (1, 3, 9, 19):
            _check_against_reference(x, k, ctx, version=version, start=start)


# ------------------------------------------------------------------------------------------------ hand computed


def _angles(*deg):
    """Unit vectors in 2-D at the given angles (degrees): ``[1, N, 2]`` float64."""
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in deg],
                        dtype=torch.float64)[None]


def test_max_sum_hand_computed_and_differs_from_k_center():
    # tokens at 0, 200, 250, 270, 330 degrees; [CLS] attention makes token 0 (0 deg) the pivot.
    # cos to the pivot: 200 -> -0.940, 250 -> -0.342, 270 -> 0, 330 -> 0.866: both versions add 200 deg second.
    # Third pick, v2 (cumulative cosine to {0, 200}): 250 -> -0.342 + cos 50 = 0.301; 270 -> 0 + cos 70 = 0.342;
    # 330 -> 0.866 + cos 130 = 0.223 -> 330 deg (index 4), although it is only 30 deg from the pivot.
    # v1 (distance to the nearest of {0, 200}): 250 -> 1 - cos 50 = 0.357; 270 -> 1 - cos 70 = 0.658;
    # 330 -> 1 - cos 30 = 0.134 -> 270 deg (index 3).
    x = _angles(0, 200, 250, 270, 330)
    cls = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    assert vtok.compress(x, "todre", keep=3, cls_attn=cls)[1].keep[0].tolist() == [0, 1, 4]
    assert vtok.compress(x, "todre", keep=3, cls_attn=cls, version="v1", start="cls")[1].keep[0].tolist() == [0, 1, 3]
    # fourth v2 pick: 250 -> 0.301 + cos 80 = 0.475; 270 -> 0.342 + cos 60 = 0.842 -> 250 deg (index 2)
    assert vtok.compress(x, "todre", keep=4, cls_attn=cls)[1].keep[0].tolist() == [0, 1, 2, 4]
    # the pivot follows the [CLS] attention: from 270 deg, cos: 0 -> 0, 200 -> 0.342, 250 -> 0.940, 330 -> 0.5,
    # so 0 deg is second; then 200 -> 0.342 + cos 200 = -0.598, 250 -> 0.940 - 0.342, 330 -> 0.5 + 0.866 -> 200 deg
    cls270 = torch.tensor([[0.1, 0.1, 0.1, 0.6, 0.1]], dtype=torch.float64)
    assert vtok.compress(x, "todre", keep=3, cls_attn=cls270)[1].keep[0].tolist() == [0, 1, 3]
    # per-head cls_attn is averaged over heads (head means: 0.35, 0.1, 0.1, 0.35, 0.1 -> tie -> lowest index 0)
    heads = torch.stack([cls, cls270], 1)
    assert vtok.compress(x, "todre", keep=3, cls_attn=heads)[1].keep[0].tolist() == [0, 1, 4]
    for k in (1, 2, 3, 4):
        assert vtok.compress(x, "todre", keep=k, cls_attn=cls)[1].keep[0].tolist() == _ref_todre(
            x[0].tolist(), k, cls_attn=cls[0].tolist())


def test_ties_go_to_the_lowest_index():
    # four copies of e1 and four of e2: the pivot (cls tie -> index 0) is e1; every e2 copy has cumulative similarity
    # 0, the lowest index of them (4) comes next; then all remaining copies tie again -> index 1
    x = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)[None]
    cls = torch.full((1, 8), 0.125, dtype=torch.float64)
    assert vtok.compress(x, "todre", keep=3, cls_attn=cls)[1].keep[0].tolist() == [0, 1, 4]
    assert vtok.compress(x, "todre", keep=2)[1].keep[0].tolist() == [0, 4]  # central: tie -> index 0


def test_default_uses_the_cls_pivot_when_given_else_the_central_token():
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(3))
    ctx = example_context("todre", x, seed=0)
    assert "cls_attn" in ctx
    pivot = ctx["cls_attn"].float().argmax(1)
    _, sel = vtok.compress(x, "todre", keep=1, **ctx)
    assert torch.equal(sel.keep[:, 0], pivot)
    _, s2 = vtok.compress(x, "todre", keep=1, **ctx, version="v2", start="cls")
    assert torch.equal(s2.keep, sel.keep)
    _, central = vtok.compress(x, "todre", keep=1)
    xn = torch.nn.functional.normalize(x, dim=-1)
    assert torch.equal(central.keep[:, 0], (xn * xn.mean(1, keepdim=True)).sum(-1).argmax(1))


# ---------------------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_half_precision_accumulates_in_fp32(half, version):
    x = torch.randn(3, 30, 8, generator=torch.Generator().manual_seed(5)).to(half)
    cls = torch.rand(3, 2, 30, generator=torch.Generator().manual_seed(6)).to(half)
    for k in (1, 6, 17):
        _, low = vtok.compress(x, "todre", keep=k, cls_attn=cls, version=version)
        _, ref = vtok.compress(x.float(), "todre", keep=k, cls_attn=cls.float(), version=version)
        assert torch.equal(low.keep, ref.keep)


def test_float64_stays_float64():
    # two tokens 1e-4 and 1.5e-4 rad from the pivot: cos = 1 - 5e-9 and 1 - 1.125e-8. In float64 the second is the
    # less similar one and is picked; in float32 both similarities round to exactly 1.0 (a tie -> lowest index).
    a, c = 1e-4, 1.5e-4
    x = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [math.cos(c), math.sin(c)]], dtype=torch.float64)[None]
    cls = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert vtok.compress(x, "todre", keep=2, cls_attn=cls)[1].keep[0].tolist() == [0, 2]
    assert _ref_todre(x[0].tolist(), 2, cls_attn=cls[0].tolist()) == [0, 2]
    assert vtok.compress(x.float(), "todre", keep=2, cls_attn=cls.float())[1].keep[0].tolist() == [0, 1]
    # v1 (k-center from the same pivot): the farther token, likewise only told apart in float64
    assert vtok.compress(x, "todre", keep=2, cls_attn=cls, version="v1", start="cls")[1].keep[0].tolist() == [0, 2]
