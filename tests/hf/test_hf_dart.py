"""DART through ``vtok.wrap`` before LLM layer K: layer K−1's RoPE'd keys pick the pivots, the hidden states entering
layer K after the final norm measure duplication; checked against a hand computation on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_tiny import IMAGE_TOKEN, left_pad, llava_prompt, tiny_llava

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _states(model, ids, am, pix, layer):
    """Keys of layer ``layer − 1`` (its input_layernorm, k_proj, RoPE at the original positions, heads concatenated,
    ``[L, Hk·dh]``) and the hidden states entering ``layer`` (``[L, D]``, and final-normed) of a one-row batch, from
    forward hooks on the unwrapped model."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    seen = {}
    h1 = lm.layers[layer - 1].register_forward_pre_hook(
        lambda mod, a, kw: seen.update(x=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    h2 = lm.layers[layer].register_forward_pre_hook(
        lambda mod, a, kw: seen.update(y=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, pixel_values=pix)
    finally:
        h1.remove()
        h2.remove()
    prev = lm.layers[layer - 1]
    attn = prev.self_attn
    with torch.no_grad():
        xk = attn.k_proj(prev.input_layernorm(seen["x"]))
        kk = xk.view(1, xk.shape[1], -1, attn.head_dim).transpose(1, 2)  # [1, Hk, L, dh]
        cos, sin = seen["pe"]
        _, kk = apply_rotary_pos_emb(kk, kk, cos, sin)
        keys = kk[0].transpose(0, 1).reshape(kk.shape[2], -1)  # [L, Hk*dh]
        feats = lm.norm(seen["y"])[0]
    return keys, seen["y"][0], feats


def _hand_selection(model, ids, am, pix, layer, k, order="set"):
    """DART by hand (``test_dart._reference``) on ``_states``; ``order="set"``: the pivots in the order of a Python set
    of their sequence indices (the wrapper's default), ``"rank"``: image pivots first."""
    from tests.pruners.test_dart import _reference

    keys, hidden, feats = _states(model, ids, am, pix, layer)
    img = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    text = torch.arange(int(img.max()) + 1, ids.shape[1])
    seq = (img, text) if order == "set" else (None, None)
    kept = _reference(hidden[img], keys[img], k, 4, 4, feats[img], feats[text], keys[text], *seq)
    return sorted(img[kept].tolist())


def _wrapped_kept(model, ids, am, pix, k, **options):
    with torch.no_grad(), vtok.wrapped(model, "dart", k, layer=2, **options):
        model(input_ids=ids, attention_mask=am, pixel_values=pix)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    img = set((ids[0] == IMAGE_TOKEN).nonzero().squeeze(1).tolist())
    return sorted(set(kept) & img)


PREFIXES = {"short": [1, 5, 9], "wraps": list(range(20, 45))}  # image at 3–18, or at 25–40 (across 32)


@pytest.mark.parametrize("prefix", sorted(PREFIXES))
@pytest.mark.parametrize("k", [6, 11])
def test_equals_the_hand_computation(model, k, prefix):
    ids, am = left_pad([llava_prompt(PREFIXES[prefix], 1, [11, 12, 13, 14, 15, 16])])
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    want = _hand_selection(model, ids, am, pix, 2, k)
    assert _wrapped_kept(model, ids, am, pix, k) == want and len(want) == k
    rank = _hand_selection(model, ids, am, pix, 2, k, order="rank")
    assert _wrapped_kept(model, ids, am, pix, k, pivot_order="rank") == rank


@pytest.mark.parametrize("prefix", sorted(PREFIXES))
def test_equals_the_authors_retained_tokens(model, prefix):
    """Where vtok's exact budget equals theirs (``k = 4 + 8 · q``, their ``keep = 8 · q``), the wrapper keeps what
    their ``get_retained_image_token`` keeps (``test_fidelity_cdpruner_dart._dart_authors``: a real Python set of
    absolute indices) on the same keys and states."""
    from tests.fidelity.test_fidelity_cdpruner_dart import _dart_authors

    ids, am = left_pad([llava_prompt(PREFIXES[prefix], 1, [11, 12, 13, 14, 15, 16])])
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    keys, _, feats = _states(model, ids, am, pix, 2)
    img = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    want = _dart_authors(feats.double(), keys.double(), int(img[0]), len(img), 8)
    assert len(want) == 12 and _wrapped_kept(model, ids, am, pix, 12) == want


def test_needs_a_layer_before_it(model):
    with pytest.raises(ValueError, match="keys"):
        vtok.wrap(model, "dart", 0.25, layer=0)


def test_generate_batch_equals_one_by_one(model):
    """DART's pivots are the largest L1 norms of RoPE'd keys, which depend on absolute positions (an L2 norm would
    not): a batch equals its samples one by one where positions follow the attention mask, as in ``generate()``
    (a plain ``model(...)`` call on a left-padded batch numbers the padding too)."""
    from tests.hf.test_hf_wrap import _batch, _gen, _one

    ids, am, pix = _batch()
    with torch.no_grad(), vtok.wrapped(model, "dart", 0.5, layer=2):
        gen = _gen(model, ids, am, pixel_values=pix)
        for i in range(3):
            ids1, am1, extra = _one(i)
            assert _gen(model, ids1, am1, **extra)[0].tolist() == gen[i].tolist()


def test_qwen2_vl_generate_batch_equals_one_by_one():
    from tests.helpers.hf_tiny_qwen import images, left_pad, qwen_prompt, tiny_qwen2_vl

    m = tiny_qwen2_vl()
    grids = [[(1, 8, 8)], [(1, 4, 8), (1, 8, 4)]]
    rows = [qwen_prompt([1, 5], grids[0], [11, 12]), qwen_prompt([3], grids[1], [11, 12, 13, 14])]
    pix = [images(g, seed=s)[0] for s, g in enumerate(grids)]
    batch = {**left_pad(rows), "pixel_values": torch.cat(pix),
             "image_grid_thw": torch.tensor([g for gs in grids for g in gs])}
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad(), vtok.wrapped(m, "dart", 0.5, layer=2):
        gen = m.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        for b in range(2):
            one = {**left_pad([rows[b]]), "pixel_values": pix[b], "image_grid_thw": torch.tensor(grids[b])}
            assert m.generate(**one, **kw)[0, one["input_ids"].shape[1]:].tolist() == gen[b].tolist()
