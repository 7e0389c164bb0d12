import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtok
from tests.helpers.hyp_settings import examples
from tests.helpers.memtools import max_alloc_bytes, nxn_bytes
from vtok.context import Context
from vtok.pruners.transprune import instruction_attention, transition_variation


def _hand_case():
    """Token 0 and 2 unchanged, token 1 grows along itself (x2 update), token 3 flips (update opposite to it)."""
    prev = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    now = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    return prev, now


def _ctx(x, seed=1, text=True):
    g = torch.Generator().manual_seed(seed)
    b, n, _ = x.shape
    out = {"prev_hidden": x + 0.5 * torch.randn(x.shape, generator=g)}
    if text:
        out["text_attn"] = torch.softmax(torch.randn(b, 3, n, generator=g), -1)
    return out


def test_registered_with_context_declarations():
    m = vtok.get_method("transprune")
    assert m.family == "transition" and m.needs == {"prev_hidden"} and m.uses == {"text_attn"}
    assert m.options == {"alpha": 0.5, "compare": "update"} and "2507.20630" in m.paper and not m.merges


def test_hand_computed_update_mode():
    prev, now = _hand_case()
    # update o = now - prev: magnitudes [0, 2, 0, 2]; 1 - cos = [1 (zero update), 0, 1, 2]
    e = math.e
    z = 2 * e + 1 + e**2
    expected = torch.tensor([[0.0, 2 * 1 / z, 0.0, 2 * e**2 / z]])
    assert torch.allclose(transition_variation(prev, now), expected, atol=1e-6)
    _, sel = vtok.compress(now, "transprune", keep=2, prev_hidden=prev)
    assert sel.keep.tolist() == [[1, 3]]  # the two tokens whose hidden state changed
    _, sel = vtok.compress(now, "transprune", keep=1, prev_hidden=prev)
    assert sel.keep.tolist() == [[3]]  # ... and the one whose direction changed most


def test_hand_computed_state_mode():
    prev, now = _hand_case()
    # o = now: magnitudes [1, 3, 1, 1]; 1 - cos = [0, 0, 0, 2]
    z = 3 + math.e**2
    expected = torch.tensor([[1 / z, 3 / z, 1 / z, math.e**2 / z]])
    assert torch.allclose(transition_variation(prev, now, compare="state"), expected, atol=1e-6)
    _, sel = vtok.compress(now, "transprune", keep=2, prev_hidden=prev, compare="state")
    assert sel.keep.tolist() == [[1, 3]]


def test_window_accumulates_consecutive_transitions():
    g = torch.Generator().manual_seed(3)
    h0, h1, h2 = (torch.randn(2, 10, 6, generator=g) for _ in range(3))
    window = transition_variation(torch.stack([h0, h1]), h2)
    assert torch.allclose(window, transition_variation(h0, h1) + transition_variation(h1, h2), atol=1e-6)


def test_iga_mixing_and_alpha_extremes():
    prev, now = _hand_case()
    text = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.9, 0.05, 0.0, 0.05]]])  # instructions look at token 0
    _, sel = vtok.compress(now, "transprune", keep=1, prev_hidden=prev, text_attn=text, alpha=0.0)
    assert sel.keep.tolist() == [[0]]  # IGA only
    _, sel = vtok.compress(now, "transprune", keep=1, prev_hidden=prev, text_attn=text, alpha=1.0)
    assert sel.keep.tolist() == [[3]]  # TTV only: text_attn ignored
    # per-head [B, H, T, N] averages to the same IGA as its head mean [B, T, N]
    per_head = torch.stack([text, 3 * text - 2 * text.mean()], 1)
    assert torch.allclose(instruction_attention(per_head), instruction_attention(per_head.mean(1)))


def test_alpha_weights_the_normalised_terms():
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(4))
    ctx = _ctx(x)
    ttv = transition_variation(ctx["prev_hidden"], x)
    iga = instruction_attention(ctx["text_attn"])
    score = 0.3 * ttv / ttv.sum(1, True) + 0.7 * iga / iga.sum(1, True)
    _, sel = vtok.compress(x, "transprune", keep=4, alpha=0.3, **ctx)
    assert torch.equal(sel.keep, score.sort(dim=1, descending=True, stable=True).indices[:, :4].sort(1).values)


def test_ties_go_to_lowest_index():
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(6))
    _, sel = vtok.compress(x, "transprune", keep=3, prev_hidden=x.clone())  # nothing changed: all scores equal
    assert sel.keep.tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("keep", [1, 5, 12, 23, 0.5, 0.1])
def test_exact_budget_sorted_unique(keep, tokens4):
    out, sel = vtok.compress(tokens4, "transprune", keep=keep, **_ctx(tokens4))
    k = vtok.resolve_k(keep, 24)
    assert out.shape == (4, k, 8) and sel.keep.shape == (4, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all() and ((sel.keep >= 0) & (sel.keep < 24)).all()
    assert torch.equal(out, tokens4.gather(1, sel.keep[..., None].expand(-1, -1, 8)))


def test_keep_all_is_bit_exact_identity(tokens4):
    ctx = _ctx(tokens4)
    out, _ = vtok.compress(tokens4, "transprune", keep=1.0, **ctx)
    assert torch.equal(out, tokens4)
    sel = vtok.get_method("transprune").fn(tokens4, 24, Context.build(tokens4, ctx)).validate()
    assert torch.equal(sel.keep, torch.arange(24).expand(4, 24)) and torch.equal(sel.apply(tokens4), tokens4)


@pytest.mark.parametrize("window", [False, True])
def test_batch_matches_one_by_one(window, tokens4):
    ctx = _ctx(tokens4)
    if window:
        ctx["prev_hidden"] = torch.stack([ctx["prev_hidden"] - 1.0, ctx["prev_hidden"]])
    out, sel = vtok.compress(tokens4, "transprune", keep=6, **ctx)
    for b in range(4):
        one = {k: (v[:, b:b + 1] if k == "prev_hidden" and window else v[b:b + 1]) for k, v in ctx.items()}
        single, s1 = vtok.compress(tokens4[b:b + 1], "transprune", keep=6, **one)
        assert torch.equal(sel.keep[b:b + 1], s1.keep) and torch.equal(out[b:b + 1], single)


def test_deterministic(tokens4):
    ctx = _ctx(tokens4)
    a = vtok.compress(tokens4, "transprune", keep=7, **ctx)[1].keep
    b = vtok.compress(tokens4, "transprune", keep=7, **ctx)[1].keep
    assert torch.equal(a, b)


def test_half_precision_input():
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5))
    ctx = _ctx(x)
    _, ref = vtok.compress(x.double(), "transprune", keep=4, prev_hidden=ctx["prev_hidden"].double())
    out, sel = vtok.compress(x.bfloat16(), "transprune", keep=4, prev_hidden=ctx["prev_hidden"].bfloat16())
    assert out.dtype == torch.bfloat16 and sel.keep.shape == (2, 4)
    assert (sel.keep == ref.keep).float().mean() > 0.5  # bf16 rounding may swap near-ties only


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_alpha_is_a_clear_error(alpha, tokens4):
    with pytest.raises(ValueError, match="alpha"):
        vtok.compress(tokens4, "transprune", keep=4, alpha=alpha, **_ctx(tokens4))


def test_bad_compare_is_a_clear_error(tokens4):
    with pytest.raises(ValueError, match="compare"):
        vtok.compress(tokens4, "transprune", keep=4, compare="delta", **_ctx(tokens4))


def test_missing_prev_hidden_is_a_clear_error(tokens4):
    with pytest.raises(ValueError, match="prev_hidden"):
        vtok.compress(tokens4, "transprune", keep=4, text_attn=torch.rand(4, 24))
    with pytest.raises(ValueError, match="prev_hidden"):  # called directly, without compress's check
        vtok.get_method("transprune").fn(tokens4, 4, Context())


def test_prev_hidden_feature_size_mismatch(tokens4):
    with pytest.raises(ValueError, match="prev_hidden"):
        vtok.compress(tokens4, "transprune", keep=4, prev_hidden=torch.randn(4, 24, 5))
    with pytest.raises(ValueError, match="prev_hidden"):
        vtok.compress(tokens4, "transprune", keep=4, prev_hidden=torch.randn(4, 23, 8))


def test_no_nxn_allocation():
    n, d = 4096, 16
    x = torch.randn(1, n, d)
    ctx = Context.build(x, {"prev_hidden": torch.randn(3, 1, n, d), "text_attn": torch.rand(1, 4, 8, n)})
    fn = vtok.get_method("transprune").fn
    peak = max_alloc_bytes(lambda: fn(x, n // 4, ctx))
    assert peak < nxn_bytes(1, n) // 64, peak  # O(N·D), far from a 64 MiB N×N matrix


@examples(30)
@given(n=st.integers(1, 40), b=st.integers(1, 3), layers=st.integers(0, 3), r=st.floats(0.01, 1.0),
       alpha=st.floats(0.0, 1.0), text=st.booleans(), seed=st.integers(0, 2**16))
def test_property_budget_and_batch_consistency(n, b, layers, r, alpha, text, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    prev = torch.randn((layers, b, n, 3) if layers else (b, n, 3), generator=g)
    ctx = {"prev_hidden": prev}
    if text:
        ctx["text_attn"] = torch.rand(b, 2, n, generator=g)
    out, sel = vtok.compress(x, "transprune", keep=r, alpha=alpha, **ctx)
    k = vtok.resolve_k(r, n)
    assert out.shape == (b, k, 3) and sel.keep.shape == (b, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    last = {key: (v[..., -1:, :, :] if key == "prev_hidden" and layers else v[-1:]) for key, v in ctx.items()}
    _, one = vtok.compress(x[-1:], "transprune", keep=r, alpha=alpha, **last)
    assert torch.equal(one.keep, sel.keep[-1:])
