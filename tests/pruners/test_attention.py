import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from tests.helpers.memtools import max_alloc_bytes, nxn_bytes
from vtok.context import Context
from vtok.pruners.zero_tprune import wpr_importance

# (method, options): every attention strategy, FoPru in both modes
CONFIGS = [
    ("cls_attn", {}),
    ("fopru", {}),
    ("fopru", {"mode": "row"}),
    ("hiprune", {}),
    ("hiprune", {"alpha": 0.6}),
    ("visionzip", {}),
    ("zero_tprune", {}),
    ("fastv", {}),
    ("fastv", {"query_source": "all"}),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else m for m, o in CONFIGS]
NEEDS_NXN = {"zero_tprune"}


def _context(x, h, w, seed=0):
    """Every context key the attention family uses, deterministic per seed, for tokens ``x [B, h*w, D]``."""
    g = torch.Generator().manual_seed(seed)
    b, n, _ = x.shape
    return {
        "grid": (h, w),
        "cls_attn": torch.rand(b, 3, n, generator=g).softmax(-1),
        "mid_attn": torch.rand(b, n, generator=g),
        "text_attn": torch.rand(b, 5, n, generator=g),
        "keys": torch.randn(b, 2, n, 4, generator=g),
        "attn": torch.randn(b, 2, n, n, generator=g).softmax(-1),
    }


def _only(method, ctx):
    info = vtok.get_method(method)
    return {key: v for key, v in ctx.items() if key in info.needs | info.uses}


def _run(x, method, keep, ctx, **opts):
    return vtok.compress(x, method, keep=keep, **_only(method, ctx), **opts)


@pytest.fixture
def ctx4(tokens4):
    return _context(tokens4, 4, 6)


def test_all_registered_as_attention_family():
    names = {m.name for m in vtok.methods("attention")}
    assert names == {"cls_attn", "fopru", "hiprune", "visionzip", "zero_tprune", "fastv",
                     "fastervlm", "vispruner", "prumerge", "prumerge_plus", "pdrop", "fitprune",
                     "sparsevlm", "holitom_llm", "mustdrop_llm"}
    assert vtok.get_method("visionzip").merges and not vtok.get_method("fastv").merges
    assert vtok.get_method("fopru").options == {"mode": "rank"}
    assert "2411.14164" in vtok.get_method("fopru").paper


# ------------------------------------------------------------------------------------------------ generic contract

@pytest.mark.parametrize("method,opts", CONFIGS, ids=IDS)
def test_keep_all_is_bit_exact_identity(method, opts, tokens4, ctx4):
    out, _ = _run(tokens4, method, 1.0, ctx4, **opts)
    assert torch.equal(out, tokens4)
    fn = vtok.get_method(method).fn
    s = fn(tokens4, 24, Context.build(tokens4, _only(method, ctx4)), **opts).validate()
    assert torch.equal(s.keep, torch.arange(24).expand(4, 24))
    assert torch.equal(s.apply(tokens4), tokens4)


@pytest.mark.parametrize("method,opts", CONFIGS, ids=IDS)
@pytest.mark.parametrize("keep", [1, 2, 5, 7, 12, 23, 0.5])
def test_exact_budget_sorted_unique(method, opts, keep, tokens4, ctx4):
    out, sel = _run(tokens4, method, keep, ctx4, **opts)
    k = vtok.resolve_k(keep, 24)
    assert out.shape == (4, k, 8) and sel.keep.shape == (4, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert ((sel.keep >= 0) & (sel.keep < 24)).all()


@pytest.mark.parametrize("method,opts", CONFIGS, ids=IDS)
def test_batch_matches_one_by_one(method, opts, tokens4, ctx4):
    out, sel = _run(tokens4, method, 7, ctx4, **opts)
    for b in range(4):
        one = {key: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for key, v in ctx4.items()}
        single, s1 = _run(tokens4[b:b + 1], method, 7, one, **opts)
        assert torch.equal(sel.keep[b:b + 1], s1.keep)
        assert torch.equal(out[b:b + 1], single)
        if sel.assign is not None:
            assert torch.equal(sel.assign[b:b + 1], s1.assign)
    assert len({tuple(r) for r in sel.keep.tolist()}) > 1  # samples really differ


@pytest.mark.parametrize("method,opts", CONFIGS, ids=IDS)
def test_deterministic(method, opts, tokens4, ctx4):
    a, sa = _run(tokens4, method, 9, ctx4, **opts)
    b, sb = _run(tokens4, method, 9, ctx4, **opts)
    assert torch.equal(a, b) and torch.equal(sa.keep, sb.keep)


@pytest.mark.parametrize("method", ["cls_attn", "fopru", "hiprune", "visionzip", "zero_tprune", "fastv"])
def test_missing_context_is_clear(method, tokens4):
    with pytest.raises(ValueError, match=f"method '{method}' needs context"):
        vtok.compress(tokens4, method, keep=6)


@pytest.mark.parametrize("key,bad", [
    ("cls_attn", torch.rand(4, 25)),
    ("cls_attn", torch.rand(4, 2, 3, 24)),
    ("mid_attn", torch.rand(3, 24)),
    ("text_attn", torch.rand(4, 2, 2, 2, 24)),
    ("attn", torch.rand(4, 24, 23)),
    ("keys", torch.rand(4, 23, 4)),
    ("grid", (5, 5)),
])
def test_wrong_shaped_context_is_clear(key, bad, tokens4, ctx4):
    method = {"cls_attn": "cls_attn", "mid_attn": "hiprune", "text_attn": "fastv", "attn": "zero_tprune",
              "keys": "visionzip", "grid": "hiprune"}[key]
    ctx = dict(_only(method, ctx4), **{key: bad})
    with pytest.raises(ValueError, match=f"context '{key}'"):
        vtok.compress(tokens4, method, keep=6, **ctx)


@pytest.mark.parametrize("method,opts,match", [
    ("fopru", {"mode": "column"}, "mode must be one of"),
    ("hiprune", {"alpha": 1.5}, "alpha must be"),
    ("hiprune", {"alpha": -0.1}, "alpha must be"),
    ("visionzip", {"dominant": 1.2}, "dominant must be"),
    ("zero_tprune", {"s_ratio": -1}, "s_ratio must be"),
    ("zero_tprune", {"iters": 0}, "iters must be"),
    ("fastv", {"query_source": "first"}, "query_source must be one of"),
])
def test_bad_options_are_clear(method, opts, match, tokens4, ctx4):
    with pytest.raises(ValueError, match=match):
        _run(tokens4, method, 6, ctx4, **opts)


@examples(40)
@given(h=st.integers(1, 7), w=st.integers(1, 7), b=st.integers(1, 3), frac=st.floats(0.0, 1.0),
       cfg=st.sampled_from(CONFIGS), seed=st.integers(0, 3))
def test_property_shapes_and_budget(h, w, b, frac, cfg, seed):
    method, opts = cfg
    n = h * w
    k = 1 + int(frac * (n - 1))
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))
    out, sel = _run(x, method, k, _context(x, h, w, seed), **opts)
    assert out.shape == (b, k, 3) and sel.keep.shape == (b, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    if sel.assign is not None:  # visionzip: every kept slot holds its own token
        slots = sel.assign.gather(1, sel.keep)
        assert torch.equal(slots, torch.arange(k).expand(b, k))


@pytest.mark.parametrize("method,opts", [c for c in CONFIGS if c[0] not in NEEDS_NXN],
                         ids=[i for i, c in zip(IDS, CONFIGS, strict=True) if c[0] not in NEEDS_NXN])
def test_no_nxn_allocation(method, opts):
    h = w = 64
    n = h * w
    x = torch.randn(1, n, 8)
    g = torch.Generator().manual_seed(0)
    ctx = Context.build(x, {
        "grid": (h, w), "cls_attn": torch.rand(1, 4, n, generator=g), "mid_attn": torch.rand(1, n, generator=g),
        "text_attn": torch.rand(1, 4, 8, n, generator=g), "keys": torch.randn(1, 4, n, 16, generator=g),
    })
    fn = vtok.get_method(method).fn
    peak = max_alloc_bytes(lambda: fn(x, n // 2, ctx, **opts).apply(x))
    assert peak < nxn_bytes(1, n) // 16


# ------------------------------------------------------------------------------------------------ hand-computed cases

def _x(n, d=4):
    return torch.randn(1, n, d, generator=torch.Generator().manual_seed(1))


def test_cls_attn_hand_computed():
    x = _x(6)
    cls = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3]])
    _, sel = vtok.compress(x, "cls_attn", keep=3, cls_attn=cls)
    assert sel.keep.tolist() == [[1, 3, 5]]
    # per head: averaged over heads (head 1 alone would pick token 0)
    per_head = torch.stack([cls[0], torch.tensor([0.6, 0.0, 0.0, 0.0, 0.0, 0.0])])[None]
    _, sel = vtok.compress(x, "cls_attn", keep=2, cls_attn=per_head)
    assert sel.keep.tolist() == [[0, 3]]  # means: .35 .25 .1 .45 0 .15
    # ties -> lowest index
    _, sel = vtok.compress(x, "cls_attn", keep=2, cls_attn=torch.ones(1, 6))
    assert sel.keep.tolist() == [[0, 1]]


def test_fopru_rank_and_row_hand_computed():
    x = _x(8)
    sig = torch.tensor([[0.4, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2]])  # grid 2 x 4: row sums 0.4, 0.8
    _, rank = vtok.compress(x, "fopru", keep=4, cls_attn=sig)
    assert rank.keep.tolist() == [[0, 4, 5, 6]]
    _, row = vtok.compress(x, "fopru", keep=4, cls_attn=sig, grid=(2, 4), mode="row")
    assert row.keep.tolist() == [[4, 5, 6, 7]]
    # 6 = one whole row + the 2 best tokens of the next row (0.4 at 0, then a tie -> lowest index 1)
    _, row6 = vtok.compress(x, "fopru", keep=6, cls_attn=sig, grid=(2, 4), mode="row")
    assert row6.keep.tolist() == [[0, 1, 4, 5, 6, 7]]
    # fewer than a row: the best tokens of the best row
    sig3 = torch.tensor([[0.4, 0.0, 0.0, 0.0, 0.1, 0.3, 0.2, 0.25]])
    _, row3 = vtok.compress(x, "fopru", keep=3, cls_attn=sig3, grid=(2, 4), mode="row")
    assert row3.keep.tolist() == [[5, 6, 7]]


def test_fopru_row_needs_grid():
    with pytest.raises(ValueError, match="grid"):
        vtok.compress(_x(8), "fopru", keep=4, cls_attn=torch.rand(1, 8), mode="row")


def _g3(*hot):
    """3x3 score map with the given (index, value) pairs, else 0."""
    s = torch.zeros(1, 9)
    for i, v in hot:
        s[0, i] = v
    return s


def test_hiprune_anchor_buffer_register_hand_computed():
    x = _x(9)
    corners = _g3((0, 0.9), (8, 0.8), (2, 0.5), (6, 0.4))
    mid = _g3((4, 1.0), (0, 0.2))
    # alpha=1, k=5: a = round(5/5) = 1 anchor (centre) + its 4 buffers = 5 tokens, no register
    _, sel = vtok.compress(x, "hiprune", keep=5, grid=(3, 3), mid_attn=mid, cls_attn=corners, alpha=1.0)
    assert sel.keep.tolist() == [[1, 3, 4, 5, 7]]
    # k=7: a = round(1.4) = 1 -> 5 anchor/buffer tokens + 2 registers by last-layer attention (corners 0, 8)
    _, sel = vtok.compress(x, "hiprune", keep=7, grid=(3, 3), mid_attn=mid, cls_attn=corners, alpha=1.0)
    assert sel.keep.tolist() == [[0, 1, 3, 4, 5, 7, 8]]
    # default alpha=0.1 at k=5: a = round(0.1) = 0, registers only
    _, sel = vtok.compress(x, "hiprune", keep=5, grid=(3, 3), mid_attn=mid, cls_attn=corners)
    assert sel.keep.tolist() == [[0, 1, 2, 6, 8]]  # 4 corners, then a tie at 0 -> index 1


def test_hiprune_border_anchor_does_not_wrap():
    x = _x(9)
    # anchor at the end of row 0 (index 2): neighbours are 1 and 5 only (3 would be a wrap-around)
    mid = _g3((2, 1.0))
    cls = _g3((3, 0.1), (0, 0.9), (8, 0.8))
    _, sel = vtok.compress(x, "hiprune", keep=5, grid=(3, 3), mid_attn=mid, cls_attn=cls, alpha=1.0)
    assert sel.keep.tolist() == [[0, 1, 2, 5, 8]]


def test_hiprune_overflow_keeps_anchor_then_best_buffers():
    x = _x(9)
    # alpha=1, k=3: a = round(0.6) = 1 anchor (4) with 4 buffers > k: keep the 2 buffers with highest mid_attn
    mid = _g3((4, 1.0), (5, 0.3), (7, 0.2), (1, 0.1))
    _, sel = vtok.compress(x, "hiprune", keep=3, grid=(3, 3), mid_attn=mid, cls_attn=_g3((0, 1.0)), alpha=1.0)
    assert sel.keep.tolist() == [[4, 5, 7]]


def test_visionzip_dominant_and_contextual_hand_computed():
    e = torch.eye(4)
    # features: 1, 3 ≈ 0; 5, 7 ≈ 4; dominant 2 and 6 by CLS attention
    x = torch.stack([e[0], e[0] + 0.1 * e[2], e[1], e[0] + 0.1 * e[3], e[2], e[2] + 0.1 * e[0], e[3],
                     e[2] + 0.2 * e[1]])[None]
    cls = torch.tensor([[0.0, 0.1, 0.9, 0.1, 0.0, 0.1, 0.8, 0.0]])
    out, sel = vtok.compress(x, "visionzip", keep=4, cls_attn=cls, dominant=0.5, merge="mean", order="position")
    # remaining [0,1,3,4,5,7], R=6, c=2, step=3 -> targets at remaining positions 0, 3 = tokens 0 and 4
    assert sel.keep.tolist() == [[0, 2, 4, 6]] and sel.order is None
    assert sel.assign.tolist() == [[0, 0, 1, 0, 2, 2, 3, 2]]
    assert torch.allclose(out[0, 0], x[0, [0, 1, 3]].mean(0))
    assert torch.allclose(out[0, 2], x[0, [4, 5, 7]].mean(0))
    assert torch.equal(out[0, 1], x[0, 2]) and torch.equal(out[0, 3], x[0, 6])
    # the authors' code (default): [dominant ascending | contextual], contextual = target + mean(other members)
    ref, sel_r = vtok.compress(x, "visionzip", keep=4, cls_attn=cls, dominant=0.5)
    assert sel_r.keep.tolist() == [[0, 2, 4, 6]] and sel_r.emitted_keep().tolist() == [[2, 6, 0, 4]]
    assert sel_r.output_of_each_token().tolist() == [[2, 2, 0, 2, 3, 3, 1, 3]]
    assert torch.equal(ref[0, 0], x[0, 2]) and torch.equal(ref[0, 1], x[0, 6])
    assert torch.allclose(ref[0, 2], x[0, 0] + x[0, [1, 3]].mean(0))
    assert torch.allclose(ref[0, 3], x[0, 4] + x[0, [5, 7]].mean(0))
    # an int dominant is a count: 2 dominant tokens of 4
    _, sel_i = vtok.compress(x, "visionzip", keep=4, cls_attn=cls, dominant=2)
    assert torch.equal(sel_i.emitted_keep(), sel_r.emitted_keep())
    # with keys the matching uses the keys, not the tokens: swap which target 1 and 5 join
    keys = x.clone()
    keys[0, 1], keys[0, 5] = x[0, 5], x[0, 1]
    _, sel_k = vtok.compress(x, "visionzip", keep=4, cls_attn=cls, keys=keys, dominant=0.5)
    assert sel_k.assign.tolist() == [[0, 2, 1, 0, 2, 0, 3, 2]]
    # per-head keys [B, H, N, dh] are averaged over heads
    _, sel_h = vtok.compress(x, "visionzip", keep=4, cls_attn=cls, keys=keys[:, None].expand(1, 2, 8, 4),
                             dominant=0.5)
    assert torch.equal(sel_h.assign, sel_k.assign)


def test_visionzip_default_split_matches_paper():
    n = 576
    x = torch.randn(1, n, 4)
    cls = torch.rand(1, n)
    for k, d in [(64, 54), (128, 108), (192, 162)]:
        _, sel = vtok.compress(x, "visionzip", keep=k, cls_attn=cls)
        dom = set(vtok.get_method("cls_attn").fn(x, d, Context.build(x, {"cls_attn": cls})).keep[0].tolist())
        assert dom <= set(sel.keep[0].tolist())
        sizes = sel.token_sizes()[0]
        kept = sel.emitted_keep()[0].tolist()
        assert all(sizes[j] == 1 for j, i in enumerate(kept) if i in dom)  # dominant tokens stand alone
        assert set(kept[:d]) == dom  # emitted first, as the authors' code does
        assert sizes.sum() == n  # every token is kept or merged into a contextual token


def test_zero_tprune_wpr_and_similarity_stage():
    # every row attends with the same distribution p, so WPR importance = p exactly
    p = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    attn = p.expand(6, 6)[None]
    assert torch.allclose(wpr_importance(attn), p[None])
    e = torch.eye(4)
    x = torch.stack([e[0], e[1], e[2], e[0] + 0.01 * e[1], e[3], e[3]])[None]  # token 3 duplicates token 0
    # r=2: I-stage drops 5 (least important); survivors 0..4 -> B={0,1,2}, A={3,4}; 3 is most similar to B
    _, sel = vtok.compress(x, "zero_tprune", keep=4, attn=attn)
    assert sel.keep.tolist() == [[0, 1, 2, 4]]
    # s_ratio=0 is plain importance top-k (3 and 4 tie -> lower index)
    _, sel0 = vtok.compress(x, "zero_tprune", keep=4, attn=attn, s_ratio=0.0)
    assert sel0.keep.tolist() == [[0, 1, 2, 3]]


def test_zero_tprune_heads_are_averaged_after_pagerank():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 3, 10, 10, generator=g).softmax(-1)
    per_head = torch.stack([wpr_importance(a[:, h]) for h in range(3)], 1).mean(1)
    assert torch.allclose(wpr_importance(a), per_head)
    x = torch.randn(2, 10, 4, generator=g)
    _, s3 = vtok.compress(x, "zero_tprune", keep=4, attn=a[:, 0])
    _, s4 = vtok.compress(x, "zero_tprune", keep=4, attn=a[:, :1].expand(2, 2, 10, 10))
    assert torch.equal(s3.keep, s4.keep)


def test_fastv_query_rows_hand_computed():
    x = _x(6)
    rows = torch.tensor([[[0.5, 0.4, 0.0, 0.1, 0.0, 0.0],
                          [0.0, 0.0, 0.05, 0.05, 0.45, 0.45]]])
    _, last = vtok.compress(x, "fastv", keep=2, text_attn=rows)
    assert last.keep.tolist() == [[4, 5]]
    # mean row .25 .2 .025 .075 .225 .225 -> 0, then a tie 4/5 -> 4
    for src in ("all", "text"):
        _, mean = vtok.compress(x, "fastv", keep=2, text_attn=rows, query_source=src)
        assert mean.keep.tolist() == [[0, 4]]
    # heads averaged: [B, H, T, N] with equal heads is the same as [B, T, N]
    _, heads = vtok.compress(x, "fastv", keep=2, text_attn=rows[:, None].expand(1, 4, 2, 6), query_source="all")
    assert heads.keep.tolist() == [[0, 4]]
    # an already-reduced [B, N] score is used as is
    _, flat = vtok.compress(x, "fastv", keep=3, text_attn=rows[:, 0])
    assert flat.keep.tolist() == [[0, 1, 3]]
