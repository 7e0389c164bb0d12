import pytest
import torch
from hyp_settings import examples
from hypothesis import given
from hypothesis import strategies as st

import vtok


@pytest.mark.parametrize(
    "tokens,match",
    [(torch.randn(4, 8), "3-D"), (torch.randn(1, 0, 8), "non-empty"), (torch.randn(0, 4, 8), "non-empty")],
)
def test_bad_token_shapes(tokens, match):
    with pytest.raises(ValueError, match=match):
        vtok.compress(tokens, "uniform", keep=0.5)


def test_nan_and_dtype():
    x = torch.randn(1, 4, 2)
    x[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="tokens contains NaN"):
        vtok.compress(x, "uniform", keep=0.5)
    with pytest.raises(TypeError, match="floating"):
        vtok.compress(torch.ones(1, 4, 2, dtype=torch.long), "uniform", keep=0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        vtok.compress([[1.0]], "uniform", keep=0.5)


@pytest.mark.parametrize("keep,match", [(0, "keep"), (-1.0, "keep"), (9, "keep as a count"), (1.01, "keep as a ratio")])
def test_bad_keep(keep, match):
    with pytest.raises(ValueError, match=match):
        vtok.compress(torch.randn(1, 8, 2), "uniform", keep=keep)


def test_unknown_method_lists_close_names():
    with pytest.raises(ValueError, match=r"did you mean \['uniform'\]"):
        vtok.compress(torch.randn(1, 8, 2), "unifrom", keep=0.5)


def test_missing_and_wrong_context():
    x = torch.randn(1, 12, 2)
    with pytest.raises(ValueError, match="needs context \\['grid'\\]"):
        vtok.compress(x, "pool2d", keep=0.5)
    with pytest.raises(ValueError, match="grid"):
        vtok.compress(x, "pool2d", keep=0.5, grid=(5, 5))
    with pytest.raises(ValueError, match="cls_attn"):
        vtok.compress(x, "uniform", keep=0.5, cls_attn=torch.randn(1, 11))


def test_unknown_option():
    with pytest.raises(TypeError, match="unknown option"):
        vtok.compress(torch.randn(1, 8, 2), "uniform", keep=0.5, sed=3)


def test_methods_table():
    rows = {m.name: m for m in vtok.methods()}
    assert {"random", "uniform", "pool2d"} <= set(rows)
    assert rows["pool2d"].needs == {"grid"} and rows["pool2d"].family == "baseline" and rows["pool2d"].merges
    assert all(m.paper and m.summary for m in rows.values())


@examples(60)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 40), st.sampled_from(["nan", "inf", "-inf", None]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]), st.data())
def test_all_finite_matches_isfinite(b, n, d, bad, dtype, data):
    """``context.all_finite`` (one aminmax pass) agrees with ``isfinite(t).all()`` wherever the bad value sits."""
    from vtok.context import all_finite

    x = torch.randn(b, n, d, generator=torch.Generator().manual_seed(n * d)).to(dtype)
    if bad is not None:
        x.view(-1)[data.draw(st.integers(0, x.numel() - 1))] = float(bad)
    assert all_finite(x) == bool(torch.isfinite(x).all()) == (bad is None)
