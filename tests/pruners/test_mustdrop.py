"""MustDrop's local spatial merging against a plain-loop reference of the authors' / LightCompress's block merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from vtok.pruners.mustdrop import mustdrop_budget


def _reference(x: torch.Tensor, h: int, w: int, r: int) -> torch.Tensor:
    """One sample ``x [N, D]``: 2 × 2 blocks, mean pairwise cosine (self excluded) per block, the ``r`` most similar
    blocks (ties: lower block first) merged into their mean, emitted first in that order, then the rest by position."""
    blocks = []
    for i in range(0, h - h % 2, 2):
        for j in range(0, w - w % 2, 2):
            blocks.append([i * w + j, i * w + j + 1, (i + 1) * w + j, (i + 1) * w + j + 1])
    sims = []
    for blk in blocks:
        total = 0.0
        for a in blk:
            for c in blk:
                if a != c:
                    total += float(torch.nn.functional.cosine_similarity(x[a].double(), x[c].double(), dim=0))
        sims.append(total / 12)
    ranked = sorted(range(len(blocks)), key=lambda q: (-sims[q], q))[:r]
    merged = {t for q in ranked for t in blocks[q]}
    out = [x[blocks[q]].double().mean(0) for q in ranked]
    out += [x[t].double() for t in range(h * w) if t not in merged]
    return torch.stack(out)


@examples(60)
@given(st.integers(2, 6), st.integers(2, 7), st.integers(0, 10_000), st.data())
def test_equals_the_block_merge_reference(h, w, seed, data):
    n = h * w
    n_win = (h // 2) * (w // 2)
    r = data.draw(st.integers(0, n_win))
    x = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.01  # some similar neighbours
    out, sel = vtok.compress(x, "mustdrop", keep=n - 3 * r, grid=(h, w))
    assert out.shape == (2, n - 3 * r, 6)
    for b in range(2):
        torch.testing.assert_close(out[b], _reference(x[b], h, w, r), rtol=0, atol=1e-12)


def test_partial_block_makes_the_budget_exact():
    x = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    for k in range(4, 16):
        out, sel = vtok.compress(x, "mustdrop", keep=k, grid=(4, 4))
        assert out.shape[1] == k
        sizes = sel.token_sizes()[0]
        assert sizes.sum() == 16 and sizes.max() <= 4
    with pytest.raises(ValueError, match="below the fewest"):
        vtok.compress(x, "mustdrop", keep=3, grid=(4, 4))


def test_identical_block_merges_first_and_budget_helper():
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))
    x[0, [10, 11, 14, 15]] = x[0, 10].clone()  # the bottom-right block is one token repeated
    out, sel = vtok.compress(x, "mustdrop", keep=13, grid=(4, 4))
    assert sel.emitted_keep()[0, 0] == 15 and torch.allclose(out[0, 0], x[0, 10])
    assert mustdrop_budget(x, (4, 4), threshold=0.999) == 13  # only that block reaches the threshold
    _, pos = vtok.compress(x, "mustdrop", keep=13, grid=(4, 4), order="position")
    assert pos.order is None and pos.keep[0].tolist() == [t for t in range(16) if t not in (10, 11, 14)]
    with pytest.raises(ValueError, match="window"):
        vtok.compress(x, "mustdrop", keep=13, grid=(4, 4), window=1)


# ---------------------------------------------------------------------------------------------------- prefill stage
def _their_filter(att, global_thr, individual_thr):
    """The authors' ``dual_attention_filter`` on one sample ``[T, N]``: the kept token indices."""
    s = att.sum(0)
    drop = (s < s.sum() * global_thr) & (att.max(0).values < individual_thr)
    return (~drop).nonzero().squeeze(1).tolist()


@examples(100)
@given(st.integers(0, 10_000), st.integers(2, 40), st.integers(1, 6), st.floats(0.005, 0.2), st.floats(0.005, 0.5))
def test_prefill_stage_at_their_count_is_their_set(seed, n, t, g_thr, i_thr):
    from vtok.pruners.mustdrop import mustdrop_llm_budget

    att = torch.rand(1, t, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4
    att = att / att.sum(-1, keepdim=True) * 0.5  # rows: half their mass on the image
    k = mustdrop_llm_budget(att, g_thr, i_thr)
    want = _their_filter(att[0], g_thr, i_thr)
    assert k == len(want)
    if k:
        tokens = torch.zeros(1, n, 2)
        _, sel = vtok.compress(tokens, "mustdrop_llm", k, text_rows_attn=att, global_thr=g_thr, individual_thr=i_thr)
        assert sel.keep[0].tolist() == want


def test_prefill_stage_by_hand():
    # shares 0.5 / 0.3 / 0.05 / 0.15, maxima 0.6 / 0.4 / 0.05 / 0.15: margins with thresholds 0.2 / 0.1 are
    # max(2.5, 6) / max(1.5, 4) / max(0.25, 0.5) / max(0.75, 1.5) = 6 / 4 / 0.5 / 1.5
    att = torch.tensor([[[0.6, 0.2, 0.05, 0.15], [0.4, 0.4, 0.05, 0.15]]])
    tokens = torch.zeros(1, 4, 2)
    _, sel = vtok.compress(tokens, "mustdrop_llm", 2, text_rows_attn=att, global_thr=0.2, individual_thr=0.1)
    assert sel.keep.tolist() == [[0, 1]]
    _, sel = vtok.compress(tokens, "mustdrop_llm", 3, text_rows_attn=att, global_thr=0.2, individual_thr=0.1)
    assert sel.keep.tolist() == [[0, 1, 3]]
    with pytest.raises(ValueError, match="global_thr"):
        vtok.compress(tokens, "mustdrop_llm", 2, text_rows_attn=att, global_thr=0.0)
