"""DART on tensors: pivots by key norm, each pivot's least-similar tokens kept; against a plain-loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples


def _reference(x, keys, k, pi=4, pt=4, feats=None, tf=None, tk=None, seq=None, tseq=None):
    """One sample, plain Python: ``x [N, D]``, ``keys [N, Dk]``; ``tf [T, D]`` / ``tk [T, Dk]`` text pivots. With
    ``seq`` (``[N]`` sequence indices; ``tseq [T]`` for the text) the pivots go in the order of a real Python
    ``set`` of their indices, built as the authors build it (image pivots, then text pivots, each by descending key
    norm); without, image pivots first, then text pivots."""
    n = x.shape[0]
    f = F.normalize((feats if feats is not None else x).double(), dim=-1)
    norms = keys.double().abs().sum(-1).tolist()
    img = sorted(range(n), key=lambda i: (-norms[i], i))[:min(pi, k)]
    piv = [f[i] for i in img]
    at = [int(seq[i]) for i in img] if seq is not None else []
    if tf is not None:
        tn = tk.double().abs().sum(-1).tolist()
        txt = sorted(range(len(tn)), key=lambda i: (-tn[i], i))[:min(pt, len(tn))]
        piv += [F.normalize(tf[i].double(), dim=0) for i in txt]
        at += [int(tseq[i]) for i in txt] if seq is not None else []
    if seq is not None:
        slot = {p: j for j, p in enumerate(at)}
        piv = [piv[slot[p]] for p in set(at)]  # noqa: C414  (the set's own iteration order is the point)
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


@examples(60)
@given(st.integers(8, 60), st.integers(0, 6), st.integers(0, 6), st.integers(0, 200), st.integers(0, 40), st.data())
def test_set_order_equals_the_loop_reference(n, pi, t, start, gap, data):
    """``pivot_order="set"`` (the default with ``seq_index``): the pivots in the order of a Python set of their
    sequence indices (image from ``start``, the text ``gap`` tokens after it), each pivot's quota as before."""
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(n * 1000 + k * 7 + start)
    x, keys, feats = torch.randn(1, n, 6, generator=g), torch.randn(1, n, 3, generator=g), torch.randn(1, n, 5,
                                                                                                         generator=g)
    tf, tk = torch.randn(1, t, 5, generator=g), torch.randn(1, t, 3, generator=g)
    seq = start + torch.arange(n)[None]
    tseq = start + n + gap + torch.arange(t)[None]
    if pi == 0 and t == 0 and k < n:
        return
    kw = dict(features=feats, seq_index=seq)
    if t:
        kw.update(text_features=tf, text_keys=tk, text_seq_index=tseq)
    _, sel = vtok.compress(x, "dart", keep=k, keys=keys, pivot_image=pi, **kw)
    want = _reference(x[0], keys[0], k, pi, 4, feats[0], tf[0] if t else None, tk[0] if t else None, seq[0],
                      tseq[0])
    assert sel.keep[0].tolist() == (want if k < n else list(range(n)))
    _, rank = vtok.compress(x, "dart", keep=k, keys=keys, pivot_image=pi, pivot_order="rank", **kw)
    want = _reference(x[0], keys[0], k, pi, 4, feats[0], tf[0] if t else None, tk[0] if t else None)
    assert rank.keep[0].tolist() == (want if k < n else list(range(n)))


def test_pivot_order_option():
    x, keys = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    seq = torch.arange(8)[None]
    with pytest.raises(ValueError, match="pivot_order"):
        vtok.compress(x, "dart", keep=3, keys=keys, pivot_order="sorted")
    with pytest.raises(ValueError, match="seq_index"):
        vtok.compress(x, "dart", keep=3, keys=keys, pivot_order="set")
    with pytest.raises(ValueError, match="text_seq_index"):  # text pivots need their indices too
        vtok.compress(x, "dart", keep=3, keys=keys, seq_index=seq, text_features=torch.randn(1, 2, 4),
                      text_keys=torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="distinct"):
        vtok.compress(x, "dart", keep=3, keys=keys, seq_index=torch.zeros_like(seq))
    with pytest.raises(ValueError, match="integer"):
        vtok.compress(x, "dart", keep=3, keys=keys, seq_index=seq.float())
    # without indices "auto" is the rank order
    a = vtok.compress(x, "dart", keep=3, keys=keys)[1].keep
    assert torch.equal(a, vtok.compress(x, "dart", keep=3, keys=keys, pivot_order="rank")[1].keep)


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
