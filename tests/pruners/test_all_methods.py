"""The strategy contract, checked generically on every registered method with synthetic context.

A new method is covered the moment it is registered: its context comes from ``vtok.bench.synthetic``.
"""

import pytest
import torch

import vtok
from vtok.bench.synthetic import GENERATORS, example_context, frame_count, most_square_grid
from vtok.context import CONTEXT_KEYS, Context
from vtok.pruners.registry import FAMILIES

METHODS = [m.name for m in vtok.methods()]
B, N, D = 3, 48, 16  # N composite: grid (6, 8), 8 frames of 6
BUDGETS = [1, 5, 24, 47]

# Methods that cannot produce every k by construction raise a ValueError naming the budget instead.
# pool2d (and downsample) need k = oh * ow with oh <= h, ow <= w: 47 is prime and larger than both sides of the
# 6 x 8 grid.
# temporal_pool needs k = ot * oh * ow with ot <= 8 frames of a 2 x 3 grid: 47 is prime and larger than 8.
BUDGET_LIMITS = {"pool2d": {47}, "downsample": {47}, "temporal_pool": {47},
                 "mustdrop": {1, 5},  # 12 blocks of 2 x 2 merged leave 12 tokens at the fewest
                 "sparsevlm": {1}}  # recycling: 15 of 48 deleted tokens merge into at least 2 clusters


def _k(name: str, k: int) -> int:
    """Fixed budgets below a method's fewest tokens (``Method.fewest``) are raised to it."""
    return max(k, vtok.get_method(name).fewest(N, {"grid": most_square_grid(N)}))


@pytest.fixture(scope="module")
def tokens():
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(0))


def _setup(name, tokens):
    ctx = example_context(name, tokens, seed=0)
    return vtok.get_method(name), ctx


def _slice(ctx, b):
    return {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in ctx.items()}


def _run(name, tokens, k, ctx, **options):
    m = vtok.get_method(name)
    c = Context.build(tokens, ctx)
    sel = m.fn(tokens, k, c, **options).validate()
    return sel, sel.apply(tokens, weights=c.get("sizes"))


def test_every_context_key_has_a_generator():
    assert set(CONTEXT_KEYS) <= set(GENERATORS)


def test_methods_rows_are_documented():
    rows = vtok.methods()
    assert {"random", "uniform", "pool2d"} <= {m.name for m in rows}
    for m in rows:
        assert m.family in FAMILIES, m.name
        assert isinstance(m.paper, str) and m.paper.strip(), f"{m.name}: paper is empty"
        assert isinstance(m.summary, str) and m.summary.strip(), f"{m.name}: summary (docstring line) is empty"
        assert (m.needs | m.uses) <= set(CONTEXT_KEYS), m.name
        assert not (m.needs & m.uses), f"{m.name}: a key is both needed and optional"


@pytest.mark.parametrize("k", BUDGETS)
@pytest.mark.parametrize("name", METHODS)
def test_exact_budget_sorted_unique(name, k, tokens):
    _, ctx = _setup(name, tokens)
    if k in BUDGET_LIMITS.get(name, ()):
        with pytest.raises(ValueError, match=f"k={k}"):
            vtok.compress(tokens, name, keep=k, **ctx)
        return
    out, sel = vtok.compress(tokens, name, keep=k, **ctx)
    if vtok.get_method(name).ragged:  # a length per sample: the mean budget is exact, padding is zeros
        assert int(sel.counts().sum()) == B * k and out.shape == (B, sel.k, D) and sel.n == N
        assert (out[~sel.valid_mask()] == 0).all()
    else:
        assert out.shape == (B, k, D) and sel.keep.shape == (B, k) and sel.n == N
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert ((sel.keep >= 0) & (sel.keep < N)).all()
    assert torch.isfinite(out).all()
    if sel.assign is not None:
        assert sel.assign.shape == (B, N) and ((sel.assign >= -1) & (sel.assign < k)).all()


@pytest.mark.parametrize("name", METHODS)
def test_fewest_is_the_budget_floor(name, tokens):
    """``Method.fewest`` is the smallest budget that runs; one below it raises a ValueError naming the budget."""
    m, ctx = _setup(name, tokens)
    f = m.fewest(N, ctx)
    assert 1 <= f <= N
    out, sel = vtok.compress(tokens, name, keep=f, **ctx)
    assert sel.k == f and out.shape == (B, f, D)
    if f > 1:
        with pytest.raises(ValueError, match=f"k={f - 1}"):
            vtok.compress(tokens, name, keep=f - 1, **ctx)
    assert {n for n in BUDGET_LIMITS.get(name, ()) if n < f} == {n for n in BUDGETS if n < f}


@pytest.mark.parametrize("name", METHODS)
def test_keep_all_is_bit_exact_identity(name, tokens):
    _, ctx = _setup(name, tokens)
    sel, out = _run(name, tokens, N, ctx)  # the strategy itself, not compress's short-cut
    assert torch.equal(sel.keep, torch.arange(N).expand(B, N))
    assert torch.equal(out, tokens)


@pytest.mark.parametrize("name", METHODS)
def test_batch_matches_one_by_one(name, tokens):
    m, ctx = _setup(name, tokens)
    k = 12
    # a ragged method's mean budget couples the batch by design; its per-sample (threshold) mode must not
    opts = {"target": float(ctx["prefix_error"].median())} if m.ragged else {}
    sel, out = _run(name, tokens, k, ctx, **opts)
    for b in range(B):
        one, single = _run(name, tokens[b:b + 1], k, _slice(ctx, b), **opts)
        if m.ragged:
            n_b = int(sel.counts()[b])
            assert one.k == n_b and torch.equal(out[b:b + 1, :n_b], single), f"sample {b}"
            continue
        if m.merges:
            assert torch.allclose(out[b:b + 1], single, atol=1e-5, rtol=1e-5), f"sample {b}"
        else:
            assert torch.equal(sel.keep[b:b + 1], one.keep), f"sample {b}"
            assert torch.equal(out[b:b + 1], single), f"sample {b}"


@pytest.mark.parametrize("name", METHODS)
def test_deterministic(name, tokens):
    _, ctx = _setup(name, tokens)
    s1, o1 = _run(name, tokens, _k(name, 10), ctx)
    s2, o2 = _run(name, tokens, _k(name, 10), ctx)
    assert torch.equal(s1.keep, s2.keep) and torch.equal(o1, o2)
    assert (s1.assign is None) == (s2.assign is None)
    if s1.assign is not None:
        assert torch.equal(s1.assign, s2.assign)


# --- the synthetic context generator itself -------------------------------------------------------------------


def test_example_context_is_valid_and_seeded(tokens):
    from vtok.pruners.registry import Method

    every = Method("every", None, "baseline", frozenset(CONTEXT_KEYS), frozenset(), "", False, "", {})
    a = example_context(every, tokens, seed=3)
    Context.build(tokens, a)  # validates every key
    assert set(a) == set(CONTEXT_KEYS)
    b = example_context(every, tokens, seed=3)
    c = example_context(every, tokens, seed=4)
    for key, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[key]), key
            assert v.shape[0] == B and v.dtype == (tokens.dtype if v.is_floating_point() else torch.long), key
    assert not torch.equal(a["text_attn"], c["text_attn"])
    assert a["grid"] == (6, 8) and a["frames"] == 8 and a["text_attn"].shape == (B, 8, N)
    for key in ("cls_attn", "mid_attn", "text_attn", "attn"):
        assert (a[key] > 0).all() and torch.allclose(a[key].sum(-1), torch.ones(a[key].shape[:-1])), key
    assert a["prev_hidden"].shape == tokens.shape and torch.equal(a["sizes"], torch.ones(B, N))
    # a key's value does not depend on which other keys the method declares
    assert torch.equal(example_context("transprune", tokens, seed=3)["prev_hidden"], a["prev_hidden"])


def test_example_context_shapes_helpers():
    assert [most_square_grid(n) for n in (1, 12, 48, 49, 576, 2880)] == [(1, 1), (3, 4), (6, 8), (7, 7), (24, 24),
                                                                         (48, 60)]
    assert most_square_grid(97) == (1, 97)  # prime N: a single row
    assert frame_count(48) == 8 and frame_count(97) == 1 and 64 % frame_count(64) == 0


def test_example_context_reports_missing_generator(tokens):
    from vtok.pruners.registry import Method

    m = Method("x", None, "baseline", frozenset({"cls_attn"}), frozenset(), "", False, "", {})
    saved = GENERATORS.pop("cls_attn")
    try:
        with pytest.raises(NotImplementedError, match="cls_attn"):
            example_context(m, tokens)
    finally:
        GENERATORS["cls_attn"] = saved


@pytest.mark.parametrize("name", METHODS)
def test_inputs_that_require_grad(name, tokens):
    """Features straight out of a model outside ``torch.no_grad()`` (the README's encoder example) require grad:
    every method runs on them, picks what it picks on detached features, and keeps the graph of the kept tokens."""
    x = tokens.clone().requires_grad_()
    m, ctx = _setup(name, tokens)
    k = _k(name, 5)
    with torch.no_grad():
        ref_sel, ref_out = _run(name, tokens, k, ctx)
    sel, out = _run(name, x, k, ctx)
    assert torch.equal(sel.keep, ref_sel.keep)
    torch.testing.assert_close(out.detach(), ref_out)
    assert out.requires_grad


def test_methods_of_an_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family must be one of"):
        vtok.methods("bogus")
    assert vtok.methods("temporal") and all(m.family == "temporal" for m in vtok.methods("temporal"))


def test_each_method_lives_in_the_module_named_after_it():
    """Issue #32: ``vtok/pruners/<name>.py``, or ``<base>.py`` for a variant / other stage ``<base>_<suffix>`` of a
    registered method ``<base>`` (the rule in ``vtok/pruners/__init__.py``); ``Method.source`` names the file."""
    names = {m.name for m in vtok.methods()}
    for m in vtok.methods():
        folder, _, stem = m.source.removesuffix(".py").rpartition("/")
        assert folder == "vtok/pruners", (m.name, m.source)
        assert stem == m.name or (m.name.startswith(stem + "_") and stem in names), (m.name, m.source)
    assert vtok.get_method("visionzip").source == "vtok/pruners/visionzip.py"
    assert vtok.get_method("prumerge_plus").source == "vtok/pruners/prumerge.py"


def test_source_of_a_method_defined_elsewhere():
    """Outside the package the path is absolute; without a file (``exec``) it is ``None``."""
    from pathlib import Path

    from vtok.pruners.registry import Method

    def local(tokens, k, ctx):
        return None

    def method(fn):
        return Method("x", fn, "baseline", frozenset(), frozenset(), "p", False, "", {})

    assert method(local).source == str(Path(__file__).resolve())
    ns: dict = {}
    exec("def built(tokens, k, ctx):\n    return None\n", ns)
    assert method(ns["built"]).source is None
