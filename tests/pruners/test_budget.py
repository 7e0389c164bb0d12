import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtok.budget import resolve_k, resolve_ks


@given(n=st.integers(1, 5000), r=st.floats(1e-6, 1.0, allow_nan=False))
def test_ratio_gives_rounded_k_in_range(n, r):
    k = resolve_k(r, n)
    assert 1 <= k <= n
    assert k == min(n, max(1, math.floor(r * n + 0.5)))


@given(n=st.integers(1, 5000), data=st.data())
def test_count_is_exact(n, data):
    c = data.draw(st.integers(1, n))
    assert resolve_k(c, n) == c


@given(n=st.integers(1, 5000))
def test_ratio_one_is_all(n):
    assert resolve_k(1.0, n) == n


def test_documented_cases():
    assert resolve_k(0.25, 576) == 144
    assert resolve_k(0.5, 5) == 3  # 2.5 rounds half up
    assert resolve_k(0.001, 10) == 1  # at least one
    assert resolve_k(0.29, 100) == 29  # no float drift
    assert resolve_ks(0.5, [4, 6]) == [2, 3]
    assert resolve_ks([1, 0.5], [4, 6]) == [1, 3]


@pytest.mark.parametrize(
    "keep,n,match",
    [(0, 10, "keep"), (-0.5, 10, "keep"), (0.0, 10, "keep"), (11, 10, "keep as a count"),
     (1.5, 10, "keep as a ratio"), (float("nan"), 10, "NaN"), (64.0, 100, "pass an int")],
)
def test_bad_keep(keep, n, match):
    with pytest.raises(ValueError, match=match):
        resolve_k(keep, n)


def test_bad_types():
    with pytest.raises(TypeError, match="keep"):
        resolve_k(True, 10)
    with pytest.raises(TypeError, match="keep"):
        resolve_k("half", 10)
    with pytest.raises(ValueError, match="n"):
        resolve_k(0.5, 0)
    with pytest.raises(ValueError, match="2 entries"):
        resolve_ks([0.5, 0.5], [1, 2, 3])
