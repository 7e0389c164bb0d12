"""EVS on tensors: the serving code's retention mask, written out as a loop, and hand cases."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples


def _reference(x, t, k):
    """vLLM's ``compute_retention_mask`` for one video ``x [T·P, D]`` with the retained count forced to ``k``."""
    p = x.shape[0] // t
    v = x.reshape(t, p, -1)
    dis = [255.0] * p
    for f in range(1, t):
        dis += (1 - F.cosine_similarity(v[f], v[f - 1], dim=-1)).tolist()
    order = sorted(range(t * p), key=lambda i: (-dis[i], i))
    return sorted(order[:k])


def test_static_video_keeps_the_first_frame_then_what_moved():
    x = torch.randn(1, 4, 6).repeat(1, 3, 1)  # 3 identical frames of 4 tokens
    x[0, 9] = torch.randn(6)  # frame 2, position 1 changes
    _, sel = vtok.compress(x, "evs", keep=5, frames=3)
    assert sel.keep.tolist() == [[0, 1, 2, 3, 9]]


@examples(50)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1), st.data())
def test_equals_the_serving_code(t, p, seed, data):
    n = t * p
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 5, generator=g)
    x[:, p:] = torch.where(torch.rand(2, n - p, 1, generator=g) < 0.3, x[:, :-p], x[:, p:])  # some static tokens
    _, sel = vtok.compress(x, "evs", keep=k, frames=t)
    for b in range(2):
        assert sel.keep[b].tolist() == _reference(x[b], t, k)
