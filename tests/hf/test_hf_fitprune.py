"""FitPrune: the pruning rule (cross × self attention, heads max-reduced), the recipe's threshold counts and FLOPs
budget against loop references, the wrapper's ``self_cross_attn`` against eager attention by hand, and the fitted
recipe on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hf_tiny import IMAGE_TOKEN, eager_forward, left_pad, llava_prompt, tiny_llava
from tests.helpers.hyp_settings import examples
from vtok.pruners.fitprune import budget_reached, deletion_count, layer_flops


def test_keeps_the_largest_cross_times_self():
    tokens = torch.zeros(1, 5, 2)
    a = torch.tensor([[[0.5, 0.25, 0.5, 0.125, 1.0], [0.25, 0.5, 0.25, 0.25, 0.5]]])  # 1/8 1/8 1/8 1/32 1/2
    sel = vtok.get_method("fitprune").fn(tokens, 2, vtok.Context.build(tokens, {"self_cross_attn": a}))
    assert sel.keep.tolist() == [[0, 4]]  # 1/2, then the three-way tie at 1/8: the lowest index stays
    assert vtok.get_method("fitprune").placement.positions == "original"


def _their_loop(scores: list[float], reference: float, alpha: float) -> int:
    """The authors' counting loop, written out (the no-break case: all but one token)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    total = sum(scores)
    for i in range(len(scores)):
        if total - sum(scores[j] for j in order[:i]) < reference - reference * alpha:
            return max(i - 1, 0)
    return len(scores) - 1


@examples(150)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=30), st.integers(0, 20), st.floats(0.5, 1.5))
def test_deletion_count_is_the_authors_loop(raw, alpha_twentieths, ref_scale):
    scores = [r / 1000 for r in raw]  # distinct sums are exact enough in float64
    reference = sum(scores) * ref_scale
    alpha = alpha_twentieths / 20
    assert deletion_count(torch.tensor(scores, dtype=torch.float64), reference, alpha) == \
        _their_loop(scores, reference, alpha)


def test_deletion_count_errors():
    with pytest.raises(ValueError, match="alpha"):
        deletion_count(torch.ones(4), 1.0, 1.5)
    with pytest.raises(ValueError, match="scores"):
        deletion_count(torch.ones(2, 2), 1.0, 0.5)


def test_flops_and_budget_by_hand():
    # LLaMA-7B widths: the authors' constants (their k / v are full width, no grouped-query attention)
    before, after = layer_flops(576, 4096, 4096, 11008)
    assert before == 576 * 4096 * 4096 * 3 + 576 * 576 * 4096 * 2
    assert after == 576 * 4096 ** 2 + 3 * 11008 * 4096 * 576
    origin = 32 * (before + after)
    # before layer 0, unpruned: used = layer 0's first part, forecast = the rest: exactly the original
    assert budget_reached([576], 0, [before], 32, 4096, 4096, 11008, origin)
    assert not budget_reached([576], 0, [before], 32, 4096, 4096, 11008, origin * 0.99)


# ---------------------------------------------------------------------------------------------------- wrapped VLM
@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6)


def _sample(seed: int):
    ids, am = left_pad([llava_prompt([1, 5, 9], 1, [11, 12, 13, 14])])
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pix}


def test_self_cross_attn_is_layer_k_minus_1_head_max_attention(model):
    """The wrapper's scores equal eager attention of layer K−1 (heads max-reduced) summed by hand."""
    inp = _sample(4)
    att = eager_forward(model, **inp).attentions
    ids = inp["input_ids"][0]
    img = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    text = torch.arange(int(img.max()) + 1, len(ids))
    for layer in (1, 3):
        a = att[layer - 1][0].max(0).values  # [L, L]
        self_ = a[img][:, img].sum(0) / len(img)
        cross = a[text][:, img].sum(0)
        want = sorted(img[(self_ * cross).topk(5).indices].tolist())
        with torch.no_grad(), vtok.wrapped(model, "fitprune", 5, layer=layer):
            model(**inp)
            kept = vtok.stats(model)["per_sample"][0]["kept"]
        assert sorted(set(kept) & set(img.tolist())) == want


def test_fitted_recipe(model):
    samples = [_sample(s) for s in range(3)]
    with pytest.raises(ValueError, match="reduction"):
        vtok.fit_fitprune(model, samples, 1.0)
    with pytest.raises(ValueError, match="samples"):
        vtok.fit_fitprune(model, [], 0.5)
    two = _sample(0)
    two["input_ids"], two["attention_mask"] = left_pad([llava_prompt([1], 2, [11, 12])])
    two["pixel_values"] = torch.randn(2, 3, 28, 28)
    with pytest.raises(ValueError, match="exactly one image"):
        vtok.fit_fitprune(model, [two], 0.5)

    recipes = {r: vtok.fit_fitprune(model, samples, r) for r in (0.3, 0.6)}
    assert vtok.fit_fitprune(model, samples, 0.6) == recipes[0.6]  # deterministic
    cost = {}
    for r, sched in recipes.items():
        assert sched.n_image == 16 and 0.0 < sched.alpha <= 1.0
        assert sched.layers == sorted(set(sched.layers)) and all(1 <= ly < 6 for ly in sched.layers)
        assert all(a >= b for a, b in zip(sched.keep, sched.keep[1:], strict=False)) and 0 < sched.keep[-1] < 1
        left = [16 - sum(d for ly, d in sched.deletions.items() if ly < layer) for layer in range(6)]
        assert [round(k * 16) for k in sched.keep] == [left[ly] for ly in sched.layers]
        with torch.no_grad(), vtok.wrapped(model, "fitprune", sched.keep, layer=sched.layers):
            model(**samples[0])
            assert vtok.stats(model)["per_sample"][0]["visual_after"] == round(sched.keep[-1] * 16)
        cost[r] = sum(n * n for n in left)
    assert cost[0.6] < cost[0.3]
