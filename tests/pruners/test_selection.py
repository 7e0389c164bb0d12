import pytest
import torch

from vtok import Selection


def test_gather_and_identity():
    x = torch.randn(2, 5, 3)
    sel = Selection(torch.tensor([[0, 2], [1, 4]]), 5).validate()
    out = sel.apply(x)
    assert torch.equal(out[0], x[0, [0, 2]]) and torch.equal(out[1], x[1, [1, 4]])
    ident = Selection.identity(2, 5)
    assert torch.equal(ident.apply(x), x)


def test_merge_hand_computed():
    # tokens 0,1 -> slot 0 ; token 2 dropped ; tokens 3 -> slot 1 ; weights (sizes) 1,3,_,2
    x = torch.tensor([[[0.0, 4.0], [4.0, 0.0], [100.0, 100.0], [1.0, 1.0]]])
    sel = Selection(torch.tensor([[1, 3]]), 4, assign=torch.tensor([[0, 0, -1, 1]])).validate()
    out = sel.apply(x, weights=torch.tensor([[1.0, 3.0, 5.0, 2.0]]))
    # slot 0: (1*[0,4] + 3*[4,0]) / 4 = [3, 1]
    assert torch.allclose(out, torch.tensor([[[3.0, 1.0], [1.0, 1.0]]]))
    assert torch.equal(sel.token_sizes(), torch.tensor([[2.0, 1.0]]))


def test_merge_half_precision_accumulates_fp32():
    x = torch.full((1, 4, 2), 1000.0, dtype=torch.float16)
    sel = Selection(torch.tensor([[0]]), 4, assign=torch.zeros(1, 4, dtype=torch.long))
    out = sel.apply(x)
    assert out.dtype == torch.float16 and torch.equal(out, torch.full((1, 1, 2), 1000.0, dtype=torch.float16))


def test_from_mask_and_kept_mask():
    m = torch.tensor([[True, False, True, False], [False, True, True, False]])
    sel = Selection.from_mask(m)
    assert sel.keep.tolist() == [[0, 2], [1, 2]]
    assert torch.equal(sel.kept_mask(), m)
    with pytest.raises(ValueError, match="same number"):
        Selection.from_mask(torch.tensor([[True, False], [True, True]]))


def test_compose_equals_sequential_application():
    x = torch.randn(2, 8, 4)
    s1 = Selection(torch.tensor([[0, 2, 3, 5, 7], [1, 2, 4, 6, 7]]), 8)
    s2 = Selection(torch.tensor([[1, 4], [0, 2]]), 5, assign=torch.tensor([[0, 0, 1, -1, 1], [0, 1, 1, 1, 0]]))
    both = s1.compose(s2).validate()
    assert torch.allclose(both.apply(x), s2.apply(s1.apply(x)))
    plain = s1.compose(Selection(torch.tensor([[0, 3], [2, 4]]), 5))
    assert plain.assign is None and torch.equal(plain.apply(x), x.gather(1, plain.keep[..., None].expand(-1, -1, 4)))


@pytest.mark.parametrize(
    "keep,assign,match",
    [
        (torch.tensor([[2, 1]]), None, "ascending"),
        (torch.tensor([[1, 1]]), None, "ascending"),
        (torch.tensor([[0, 9]]), None, r"\[0, 5\)"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 1, 2, 0, 0]]), "assign values"),
        (torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), "assign must be"),
    ],
)
def test_validate_rejects_broken(keep, assign, match):
    with pytest.raises(ValueError, match=match):
        Selection(keep, 5, assign).validate()


def test_apply_checks_shape():
    with pytest.raises(ValueError, match="tokens must have shape"):
        Selection.identity(1, 4).apply(torch.randn(1, 5, 2))


# ------------------------------------------------------------------------------------------ emission order, coef


def _random_selection(g, b, n, k, merge, ordered):
    """A random valid selection of ``k`` of ``n`` tokens (merging: every token goes to a random slot or is
    dropped), emitted in a random order unless ``ordered``."""
    keep = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
    assign = None
    if merge:
        assign = torch.randint(-1, k, (b, n), generator=g)
        assign.scatter_(1, keep, torch.arange(k).expand(b, k))  # a representative joins its own slot
    order = None if ordered else torch.stack([torch.randperm(k, generator=g) for _ in range(b)])
    return Selection(keep, n, assign, order=order).validate()


def test_order_permutes_the_output_only():
    x = torch.randn(2, 6, 3)
    sel = Selection(torch.tensor([[0, 2, 5], [1, 3, 4]]), 6, order=torch.tensor([[2, 0, 1], [0, 2, 1]])).validate()
    assert torch.equal(sel.apply(x)[0], x[0, [5, 0, 2]]) and torch.equal(sel.apply(x)[1], x[1, [1, 4, 3]])
    assert sel.emitted_keep().tolist() == [[5, 0, 2], [1, 4, 3]]
    assert sel.output_of_each_token().tolist() == [[1, -1, 2, -1, -1, 0], [-1, 0, -1, 2, 1, -1]]
    assert torch.equal(sel.gather(x), sel.apply(x))
    # from_emitted is the inverse view: same keep (ascending), same order
    back = Selection.from_emitted(sel.emitted_keep(), 6)
    assert torch.equal(back.keep, sel.keep) and torch.equal(back.order, sel.order)
    assert Selection.from_emitted(torch.tensor([[0, 4]]), 6).order is None  # ascending: no order needed


def test_order_with_merges_and_sizes_follow_the_output():
    x = torch.tensor([[[0.0], [2.0], [10.0], [20.0]]])
    sel = Selection(torch.tensor([[1, 3]]), 4, torch.tensor([[0, 0, 1, 1]]), size=torch.tensor([[2.0, 2.0]]),
                    order=torch.tensor([[1, 0]])).validate()
    assert sel.apply(x).flatten().tolist() == [15.0, 1.0]
    sel = Selection(torch.tensor([[1, 3]]), 4, torch.tensor([[0, 0, 0, 1]]), order=torch.tensor([[1, 0]]))
    assert sel.token_sizes().tolist() == [[1.0, 3.0]]  # emitted order: slot 1 (one token), then slot 0 (three)


@pytest.mark.parametrize("seed", range(20))
def test_compose_with_orders_equals_sequential_application(seed):
    g = torch.Generator().manual_seed(seed)
    b, n = 3, 12
    x = torch.randn(b, n, 4, generator=g)
    k1 = int(torch.randint(2, n, (1,), generator=g))
    k2 = int(torch.randint(1, k1 + 1, (1,), generator=g))
    flags = torch.randint(0, 2, (4,), generator=g).bool().tolist()
    s1 = _random_selection(g, b, n, k1, flags[0], flags[1])
    s2 = _random_selection(g, b, k1, k2, flags[2], flags[3])
    both = s1.compose(s2).validate()
    seq = s2.apply(s1.apply(x))
    if not (s1.merges and s2.merges):  # a mean of means is a weighted mean only when one side is a gather
        torch.testing.assert_close(both.apply(x), seq)
    assert torch.equal(both.emitted_keep(), s1.emitted_keep().gather(1, s2.emitted_keep()))
    # where each original token ends up is exact in every case
    first, second = s1.output_of_each_token(), s2.output_of_each_token()
    want = torch.where(first >= 0, second.gather(1, first.clamp_min(0)), first)
    assert torch.equal(both.output_of_each_token(), want)


def test_coef_is_an_explicit_linear_combination_and_composes():
    x = torch.randn(1, 4, 2, dtype=torch.float64)
    coef = torch.tensor([[1.0, 0.5, 0.5, 1.0]], dtype=torch.float64)
    sel = Selection(torch.tensor([[0, 3]]), 4, torch.tensor([[0, 0, 0, 1]]), coef=coef).validate()
    out = sel.apply(x, weights=torch.full((1, 4), 7.0))  # weights ignored: the coefficients are final
    torch.testing.assert_close(out[0, 0], x[0, 0] + 0.5 * (x[0, 1] + x[0, 2]))
    after = Selection(torch.tensor([[0]]), 2, torch.tensor([[0, 0]]))  # then average the two outputs
    both = sel.compose(after).validate()
    torch.testing.assert_close(both.apply(x), after.apply(out))


@pytest.mark.parametrize("kw, match", [
    (dict(order=torch.tensor([[0, 0]])), "permutation"),
    (dict(order=torch.tensor([[0, 1, 2]])), "permutation"),
    (dict(coef=torch.ones(1, 5)), "comes with assign"),
])
def test_validate_rejects_bad_order_and_coef(kw, match):
    with pytest.raises(ValueError, match=match):
        Selection(torch.tensor([[0, 1]]), 5, **kw).validate()
