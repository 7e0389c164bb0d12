import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.budget import parse_keep, resolve_k


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


def test_frame_merge_grid_message_states_the_one_frame_rule():
    """Issue 29: a per-frame grid that does not fit says h * w must be N / frames (196 here), not N."""
    x = torch.randn(1, 3136, 8)
    with pytest.raises(ValueError, match=re.escape("h * w must equal N / frames = 3136 / 16 = 196, got (14, 13) "
                                                   "(h * w = 182)")):
        vtok.compress(x, "frame_merge", keep=0.25, frames=16, grid=(14, 13))
    with pytest.raises(ValueError, match=re.escape("h * w == N=3136, got (14, 13) (h * w = 182); for video tokens "
                                                   "pass frames=T")):
        vtok.compress(x, "pool2d", keep=0.25, grid=(14, 13))
    with pytest.raises(ValueError, match="h, w >= 1"):
        vtok.compress(x, "pool2d", keep=0.25, grid=(0, 14))
    assert vtok.compress(x, "frame_merge", keep=0.25, frames=16, grid=(14, 14))[0].shape == (1, 784, 8)


def test_parse_keep_reads_text_by_resolve_ks_rule():
    """Issue 29: one rule for ``--keep`` everywhere: digits are an int count, anything else a float ratio."""
    assert parse_keep("1") == 1 and isinstance(parse_keep("1"), int)
    assert parse_keep(" 64 ") == 64 and isinstance(parse_keep("64"), int)
    for text, value in (("1.0", 1.0), ("0.5", 0.5), ("1e-1", 0.1), (".25", 0.25)):
        assert parse_keep(text) == value and isinstance(parse_keep(text), float)
    assert resolve_k(parse_keep("1"), 196) == 1 and resolve_k(parse_keep("1.0"), 196) == 196
    for text, match in (("abc", "--keep must be an int count"), ("", "--keep must be an int count"),
                        ("0", "--keep as a count must be >= 1"), ("-3", "--keep as a count must be >= 1"),
                        ("64.0", r"--keep as a ratio must be in \(0, 1\], got 64.0; pass an int \(e.g. --keep=64\)"),
                        ("inf", r"--keep as a ratio must be in \(0, 1\], got inf$"), ("nan", "--keep must be a number"),
                        ("0.0", "--keep must be > 0")):
        with pytest.raises(ValueError, match=match):
            parse_keep(text, name="--keep")


@examples(200)
@given(st.one_of(st.integers(1, 10**6), st.floats(0.0, 1.0, exclude_min=True)), st.integers(1, 10**6))
def test_parse_keep_of_the_text_equals_the_python_value(keep, n):
    """``--keep TEXT`` gives exactly what ``vtok.compress(..., keep=VALUE)`` gives, for counts and ratios."""
    parsed = parse_keep(repr(keep))
    assert parsed == keep and type(parsed) is type(keep)
    if not isinstance(keep, int) or keep <= n:
        assert resolve_k(parsed, n) == resolve_k(keep, n)


def test_sweep_reads_keep_text_by_the_same_rule():
    """``vtok sweep --keep 1,1.0,0.5,64`` and ``vtok compress-video --keep`` agree with ``parse_keep``."""
    from vtok.sweep import load_config

    cfg = load_config({"tasks": ["eval_vit"], "models": ["eval_vit"], "methods": ["random"], "placements": ["after"]},
                      keeps="1,1.0,0.5,64")
    assert [(k, type(k)) for k in cfg.keeps] == [(v, type(v)) for v in map(parse_keep, ["1", "1.0", "0.5", "64"])]
