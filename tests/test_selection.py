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
