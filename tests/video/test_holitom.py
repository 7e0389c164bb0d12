"""HoliTom (outer-LLM): the segmentation against brute force over every segmentation, savings by hand, and the merge
rules on hand-built videos."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.pruners.dpc_knn import dpc_knn
from vtok.pruners.holitom import holitom_segments, static_counts


def test_static_counts_by_hand():
    # token 0 static over frames 0-1-2, token 1 only 0-1, token 2 only 1-2
    static = torch.tensor([[True, True, False], [True, False, True]])
    saved = static_counts(static)
    assert saved.tolist() == [[0, 2, 2 * 1], [0, 0, 2], [0, 0, 0]]  # [0,1]: 2 tokens x 1; [0,2]: 1 token x 2


def _brute(static: torch.Tensor, max_window: int) -> int:
    t = static.shape[0] + 1
    saved = static_counts(static).tolist()
    best = 0
    for cuts in itertools.product([False, True], repeat=t - 1):  # a cut after frame i
        segs, s = [], 0
        for i, c in enumerate(cuts):
            if c:
                segs.append((s, i))
                s = i + 1
        segs.append((s, t - 1))
        if all(e - s + 1 <= max_window for s, e in segs):
            best = max(best, sum(saved[s][e] for s, e in segs))
    return best


@examples(150)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 9), st.integers(0, 10_000))
def test_segments_maximise_the_saving(t, p, max_window, seed):
    static = torch.rand(t - 1, p, generator=torch.Generator().manual_seed(seed)) < 0.7
    segs, saved = holitom_segments(static, max_window)
    assert segs[0][0] == 0 and segs[-1][1] == t - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(segs, segs[1:], strict=False))
    assert all(e - s + 1 <= max_window for s, e in segs)
    assert saved == sum(static_counts(static)[s, e] for s, e in segs) == _brute(static, max_window)


def test_identical_frames_merge_into_one():
    """Four identical frames are one static segment: at k = P every token is its own cluster, i.e. the frame."""
    frame = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    x = frame.repeat(1, 4, 1)
    out, sel = vtok.compress(x, "holitom", 16, frames=4)
    assert torch.allclose(out, frame, atol=1e-6) and sel.keep.tolist() == [list(range(16))]  # in frame 0


def test_static_clusters_use_beta():
    """One static segment, 3 clusters of the frame means: each output is β · centre + (1 − β) · mean(others)."""
    g = torch.Generator().manual_seed(1)
    frame = torch.randn(12, 6, generator=g)
    x = torch.stack([frame + 0.01 * torch.randn(12, 6, generator=g) for _ in range(3)])[None].reshape(1, 36, 6)
    out, sel = vtok.compress(x, "holitom", 3, frames=3, tau=0.9, beta=0.6)
    mean = x[0].reshape(3, 12, 6).mean(0)
    ref = dpc_knn(mean[None], 3, vtok.Context(), knn=3, order="position")
    for j, c in enumerate(ref.keep[0].tolist()):
        others = [i for i in range(12) if int(ref.assign[0, i]) == j and i != c]
        want = 0.6 * mean[c] + 0.4 * mean[others].mean(0) if others else mean[c]
        assert torch.allclose(out[0, j], want, atol=1e-5)
    assert sel.keep[0].tolist() == ref.keep[0].tolist()  # centres sit in the segment's first frame


def test_dynamic_frames_keep_the_most_attended():
    """Nothing static (tau = 1): each frame is a pool of P, k = 3 per frame, the top attention of each frame."""
    g = torch.Generator().manual_seed(2)
    x, att = torch.randn(2, 4 * 10, 5, generator=g), torch.rand(2, 40, generator=g)
    _, sel = vtok.compress(x, "holitom", 12, frames=4, tau=1.0, cls_attn=att)
    for b in range(2):
        want = sorted(f * 10 + j for f in range(4) for j in att[b, f * 10:(f + 1) * 10].topk(3).indices.tolist())
        assert sel.keep[b].tolist() == want and not bool((sel.assign[b] >= 0).sum() > 12)


def test_budget_split_and_errors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 9, 4, generator=g)
    x = torch.cat([base, base, torch.randn(1, 9, 4, generator=g)], 1)  # frames 0-1 identical, frame 2 new
    for k in range(1, 28):
        out, sel = vtok.compress(x, "holitom", k, frames=3)
        assert out.shape == (1, k, 4) and torch.isfinite(out).all()
    for bad in ({"tau": 2.0}, {"beta": -0.1}, {"dominant": 1.5}, {"knn": 0}, {"max_window": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vtok.compress(x, "holitom", 5, frames=3, **bad)
    with pytest.raises(ValueError, match="frames"):
        vtok.compress(x, "holitom", 5)


# ---------------------------------------------------------------------------------------------------- inner-LLM
@examples(80)
@given(st.integers(0, 10_000), st.integers(2, 30), st.data())
def test_llm_merge_is_their_running_average(seed, n, data):
    """The authors' loop: top-k of the last row's attention, then each dropped token in position order averaged into
    its most similar kept token (similarities from the unmerged states)."""
    _check_running_average(seed, n, data.draw(st.integers(1, n)))


def test_llm_merge_near_tie_in_float64():
    """Two cosine similarities 1e-7 apart: fp64 input is compared in fp64 (a once-failing hypothesis example)."""
    _check_running_average(174, 11, 8)


def _check_running_average(seed: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
    att = torch.rand(2, 3, n, generator=g, dtype=torch.float64)  # [B, T, N]: the last row is what counts
    out, sel = vtok.compress(x, "holitom_llm", k, text_attn=att)
    xn = torch.nn.functional.normalize(x, dim=-1)
    for b in range(2):
        top = sorted(att[b, -1].topk(k).indices.tolist())
        h = x[b].clone()
        for i in range(n):
            if i not in top:
                j = top[int((xn[b, i] @ xn[b, top].T).argmax())]
                h[j] = (h[j] + h[i]) / 2
        assert sel.keep[b].tolist() == top
        assert torch.allclose(out[b], h[top], atol=1e-12)
