"""DART on tensors: pivots by key norm, each pivot's least-similar tokens kept; against a plain-loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hyp_settings import examples
from hypothesis import given
from hypothesis import strategies as st

import vtok


def _reference(x, keys, k, pi=4, pt=4, feats=None, tf=None, tk=None):
    """One sample, plain Python: ``x [N, D]``, ``keys [N, Dk]``; ``tf [T, D]`` / ``tk [T, Dk]`` text pivots."""
    n = x.shape[0]
    f = F.normalize((feats if feats is not None else x).double(), dim=-1)
    norms = keys.double().abs().sum(-1).tolist()
    img = sorted(range(n), key=lambda i: (-norms[i], i))[:min(pi, k)]
    piv = [f[i] for i in img]
    if tf is not None:
        tn = tk.double().abs().sum(-1).tolist()
        txt = sorted(range(len(tn)), key=lambda i: (-tn[i], i))[:min(pt, len(tn))]
        piv += [F.normalize(tf[i].double(), dim=0) for i in txt]
    kept = set(img)
    rest = k - len(img)
    for j, p in enumerate(piv):
        q = rest // len(piv) + (1 if j < rest % len(piv) else 0)
        cand = sorted((float(p @ f[i]), i) for i in range(n) if i not in kept)
        kept |= {i for _, i in cand[:q]}
    return sorted(kept)


def test_hand_case_keeps_what_the_pivot_does_not_duplicate():
    # token 0 has the largest key norm (the pivot); 1 and 2 duplicate it, 3 is orthogonal, 4 opposite
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]])[None]
    keys = torch.tensor([[5.0], [1.0], [1.0], [1.0], [1.0]])[None]
    _, sel = vtok.compress(x, "dart", keep=3, keys=keys, pivot_image=1)
    assert sel.keep.tolist() == [[0, 3, 4]]


@examples(60)
@given(st.integers(2, 40), st.integers(1, 4), st.integers(0, 6), st.integers(0, 5), st.booleans(), st.data())
def test_equals_the_loop_reference(n, d, pi, t, heads, data):
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(2, n, 3 * d, generator=g)
    keys = torch.randn(2, 2, n, d, generator=g) if heads else torch.randn(2, n, d, generator=g)
    feats = torch.randn(2, n, 5, generator=g)
    tf, tk = torch.randn(2, t, 5, generator=g), torch.randn(2, t, d, generator=g)
    if pi == 0 and t == 0 and k < n:
        with pytest.raises(ValueError, match="no pivot"):
            vtok.compress(x, "dart", keep=k, keys=keys, pivot_image=0)
        return
    kw = dict(features=feats, text_features=tf, text_keys=tk) if t else dict(features=feats)
    _, sel = vtok.compress(x, "dart", keep=k, keys=keys, pivot_image=pi, **kw)
    for b in range(2):
        kb = keys[b].transpose(0, 1).reshape(n, -1) if heads else keys[b]
        want = _reference(x[b], kb, k, pi, 4, feats[b], tf[b] if t else None, tk[b] if t else None)
        assert sel.keep[b].tolist() == (want if k < n else list(range(n)))


def test_bad_inputs():
    x, keys = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="pivot_image"):
        vtok.compress(x, "dart", keep=3, keys=keys, pivot_image=-1)
    with pytest.raises(ValueError, match="both"):
        vtok.compress(x, "dart", keep=3, keys=keys, text_features=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="keys"):
        vtok.compress(x, "dart", keep=3)
    with pytest.raises(ValueError, match="text_features"):
        vtok.compress(x, "dart", keep=3, keys=keys, text_features=torch.randn(1, 2, 5), text_keys=torch.randn(1, 2, 4))
