"""Ordered-token strategies (``prefix``, ``adaptive_length``) and ragged selections (per-sample budgets)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtok
from vtok.pruners.adaptive_length import allocate_lengths, threshold_lengths
from vtok.selection import Selection


def _curves(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values


def test_prefix_is_the_first_k_and_identity_at_n():
    x = torch.randn(2, 10, 3)
    out, sel = vtok.compress(x, "prefix", 4)
    assert torch.equal(out, x[:, :4]) and torch.equal(sel.keep, torch.arange(4).expand(2, 4))
    sel = vtok.get_method("prefix").fn(x, 10, {})
    assert torch.equal(sel.apply(x), x)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 5), seed=st.integers(0, 10_000), data=st.data())
def test_allocation_equals_brute_force(b, n, seed, data):
    """The DP's total error is the minimum over every allocation with the same sum (non-convex curves too)."""
    e = torch.rand(b, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    total = data.draw(st.integers(b, b * n))
    lengths = allocate_lengths(e, total)
    assert int(lengths.sum()) == total and bool(((lengths >= 1) & (lengths <= n)).all())
    got = sum(float(e[i, int(v) - 1]) for i, v in enumerate(lengths))
    best = min(sum(float(e[i, v - 1]) for i, v in enumerate(c))
               for c in itertools.product(range(1, n + 1), repeat=b) if sum(c) == total)
    assert got == pytest.approx(best, abs=1e-12)


def test_mean_budget_is_exact_and_follows_the_curves():
    e = _curves(4, 16)
    e[0] *= 0.01  # an easy image
    e[3] *= 10.0  # a hard one
    x = torch.randn(4, 16, 8)
    out, sel = vtok.compress(x, "adaptive_length", 0.25, prefix_error=e)
    assert int(sel.lengths.sum()) == 4 * 4 and sel.lengths[0] < sel.lengths[3]
    assert out.shape == (4, int(sel.lengths.max()), 8)
    for b in range(4):
        n_b = int(sel.lengths[b])
        assert torch.equal(out[b, :n_b], x[b, :n_b]) and bool((out[b, n_b:] == 0).all())
    # min_k is a floor for every image
    _, sel = vtok.compress(x, "adaptive_length", 0.25, prefix_error=e, min_k=3)
    assert int(sel.counts().min()) >= 3 and int(sel.counts().sum()) == 16


def test_keep_all_is_identity_and_one_image_gets_k():
    e, x = _curves(3, 8), torch.randn(3, 8, 2)
    sel = vtok.get_method("adaptive_length").fn(x, 8, {"prefix_error": e})
    assert sel.lengths is None and torch.equal(sel.apply(x), x)
    _, one = vtok.compress(x[:1], "adaptive_length", 5, prefix_error=e[:1])
    assert one.k == 5 and one.lengths is None


def test_threshold_mode_is_per_image_and_capped():
    e = torch.tensor([[0.9, 0.5, 0.1, 0.05], [0.9, 0.8, 0.7, 0.6], [0.05, 0.04, 0.03, 0.02]])
    assert threshold_lengths(e, 0.5, cap=4).tolist() == [2, 4, 1]
    assert threshold_lengths(e, 0.5, cap=3).tolist() == [2, 3, 1]
    x = torch.randn(3, 4, 2)
    _, sel = vtok.compress(x, "adaptive_length", 3, prefix_error=e, target=0.5)
    assert sel.counts().tolist() == [2, 3, 1]


def test_bad_options_and_counts_fail_clearly():
    x, e = torch.randn(2, 6, 3), _curves(2, 6)
    with pytest.raises(ValueError, match="needs context"):
        vtok.compress(x, "adaptive_length", 0.5)
    with pytest.raises(ValueError, match="target must be 'mean'"):
        vtok.compress(x, "adaptive_length", 0.5, prefix_error=e, target="median")
    with pytest.raises(ValueError, match="min_k must be <= k"):
        vtok.compress(x, "adaptive_length", 2, prefix_error=e, min_k=3)
    with pytest.raises(ValueError, match="prefix_error"):
        vtok.compress(x, "adaptive_length", 0.5, prefix_error=-e)
    with pytest.raises(ValueError, match="not known before the encoder runs"):
        vtok.retained_count("adaptive_length", 6, 0.5)
    with pytest.raises(ValueError, match="one keep"):
        vtok.compress(x, "adaptive_length", [2, 3], prefix_error=e)


@pytest.mark.parametrize("method", ["random", "divprune", "tome", "kmedoids", "visionzip", "prefix"])
def test_per_sample_budgets_equal_one_by_one(method):
    from vtok.bench.synthetic import example_context

    x = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    ctx = example_context(method, x, seed=0)
    ks = [3, 7, 16]
    out, sel = vtok.compress(x, method, ks, **ctx)
    assert sel.counts().tolist() == ks and out.shape == (3, 16, 8)
    assert sel.kept_mask().sum(1).tolist() == ks
    for b, k in enumerate(ks):
        one_ctx = {key: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for key, v in ctx.items()}
        single, one = vtok.compress(x[b:b + 1], method, k, **one_ctx)
        assert torch.allclose(out[b:b + 1, :k], single, atol=1e-6), b
        assert bool((out[b, k:] == 0).all())
        assert torch.equal(sel.emitted_keep()[b, :k], one.emitted_keep()[0])
    assert torch.equal(sel.gather(torch.arange(16).expand(3, 16))[~sel.valid_mask()], torch.zeros(16 * 3 - 26,
                                                                                                    dtype=torch.long))


def test_equal_per_sample_budgets_are_not_ragged_and_compose_refuses_ragged():
    x = torch.randn(2, 8, 4)
    out, sel = vtok.compress(x, "random", [4, 4])
    assert sel.lengths is None and out.shape == (2, 4, 4)
    _, ragged = vtok.compress(x, "random", [2, 5])
    with pytest.raises(ValueError, match="ragged"):
        ragged.compose(Selection.identity(2, 5))


def test_ragged_selection_validation():
    keep = torch.arange(4).expand(2, 4).contiguous()
    with pytest.raises(ValueError, match="lengths must lie"):
        Selection(keep, 6, lengths=torch.tensor([2, 3])).validate()  # max(lengths) != k
    with pytest.raises(ValueError, match="lengths must be a LongTensor"):
        Selection(keep, 6, lengths=torch.tensor([4.0, 2.0])).validate()
    assign = torch.tensor([[0, 1, 2, 3, 3, -1], [0, 1, 2, 2, -1, -1]])
    with pytest.raises(ValueError, match="padding"):
        Selection(keep, 6, assign=assign, lengths=torch.tensor([4, 2])).validate()
