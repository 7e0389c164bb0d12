import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.context import Context
from vtok.pruners._grid import pool_grid

BASELINES = ["random", "uniform", "pool2d"]


def _ctx(n):
    return {"grid": (4, n // 4)}


@pytest.mark.parametrize("method", BASELINES)
def test_keep_all_is_bit_exact_identity(method, tokens4):
    out, sel = vtok.compress(tokens4, method, keep=1.0, **_ctx(24))
    assert torch.equal(out, tokens4)
    # the strategy itself (not only compress's short-cut) is the identity at k = N
    fn = vtok.get_method(method).fn
    s = fn(tokens4, 24, Context.build(tokens4, _ctx(24))).validate()
    assert torch.equal(s.apply(tokens4), tokens4)
    assert torch.equal(s.keep, torch.arange(24).expand(4, 24))


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("keep", [1, 3, 6, 12, 0.5, 0.25])
def test_exact_budget_sorted_unique(method, keep, tokens4):
    out, sel = vtok.compress(tokens4, method, keep=keep, **_ctx(24))
    k = vtok.resolve_k(keep, 24)
    assert out.shape == (4, k, 8) and sel.keep.shape == (4, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert ((sel.keep >= 0) & (sel.keep < 24)).all()


@pytest.mark.parametrize("method", BASELINES)
def test_batch_matches_one_by_one(method, tokens4):
    out, _ = vtok.compress(tokens4, method, keep=6, **_ctx(24))
    for b in range(4):
        single, _ = vtok.compress(tokens4[b:b + 1], method, keep=6, **_ctx(24))
        assert torch.equal(out[b:b + 1], single)


def test_gather_takes_each_samples_own_tokens(tokens4):
    out, sel = vtok.compress(tokens4, "uniform", keep=6)
    for b in range(4):
        assert torch.equal(out[b], tokens4[b, sel.keep[b]])
    assert not torch.equal(out[0], out[1])


def test_uniform_hand_computed():
    _, sel = vtok.compress(torch.randn(1, 10, 2), "uniform", keep=4)
    assert sel.keep.tolist() == [[1, 3, 6, 8]]  # floor((2j+1)*10/8)


def test_random_is_seeded_and_reproducible(tokens4):
    _, a = vtok.compress(tokens4, "random", keep=5, seed=7)
    _, b = vtok.compress(tokens4, "random", keep=5, seed=7)
    _, c = vtok.compress(tokens4, "random", keep=5, seed=8)
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep, c.keep)
    _, d = vtok.compress(tokens4, "random", keep=5, seed=[1, 2, 3, 4])
    assert len({tuple(r) for r in d.keep.tolist()}) > 1
    with pytest.raises(ValueError, match="seed"):
        vtok.compress(tokens4, "random", keep=5, seed=[1, 2])


def test_pool2d_matches_avg_pool_on_non_square_grid():
    h, w, d = 6, 4, 5
    x = torch.randn(3, h * w, d)
    out, sel = vtok.compress(x, "pool2d", keep=6, grid=(h, w))  # -> 3 x 2 grid of 2x2 cells
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(3, d, h, w), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)
    # each output takes its cell centre's position; every patch is assigned
    assert sel.keep[0].tolist() == [0, 2, 8, 10, 16, 18]
    assert (sel.assign >= 0).all() and torch.equal(sel.token_sizes(), torch.full((3, 6), 4.0))


def test_pool2d_uneven_bins_partition_grid():
    x = torch.randn(1, 5 * 7, 3)
    out, sel = vtok.compress(x, "pool2d", keep=6, grid=(5, 7))
    assert pool_grid(5, 7, 6) == (2, 3)
    assert sel.token_sizes().sum() == 35
    # each output is the mean of exactly the tokens assigned to it
    for j in range(6):
        assert torch.allclose(out[0, j], x[0, sel.assign[0] == j].mean(0), atol=1e-6)


def test_pool2d_impossible_budget_is_clear():
    with pytest.raises(ValueError, match="nearest possible budgets"):
        vtok.compress(torch.randn(1, 16, 2), "pool2d", keep=7, grid=(4, 4))


@examples(40)
@given(n=st.integers(1, 64), b=st.integers(1, 3), r=st.floats(0.01, 1.0), method=st.sampled_from(["random", "uniform"]))
def test_property_shapes_and_budget(n, b, r, method):
    x = torch.randn(b, n, 3)
    out, sel = vtok.compress(x, method, keep=r)
    k = vtok.resolve_k(r, n)
    assert out.shape == (b, k, 3)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
