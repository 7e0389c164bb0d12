import pytest
import torch

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
