"""PyramidDrop through ``vtok.wrap``: each stage ranks the image tokens by the last prompt token's attention in the
stage's *own* decoder layer (computed on the sequence entering it), unlike FastV's previous layer."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_tiny import IMAGE_TOKEN, eager_forward, left_pad, llava_prompt, tiny_llava

pytest.importorskip("transformers")

PROMPTS = [llava_prompt([1, 5, 9], 1, [11, 12, 13]), llava_prompt([3], 2, [11, 12, 13, 14, 15]), [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _pix(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_registered_with_own_layer_attention():
    info = vtok.get_method("pdrop")
    assert info.needs == {"text_attn"} and info.placement.attn_layer == "own"
    assert vtok.get_method("fastv").placement.attn_layer == "previous"
    att = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.05]])
    _, sel = vtok.compress(torch.randn(1, 5, 4), "pdrop", keep=2, text_attn=att)
    assert sel.keep.tolist() == [[1, 3]]  # ties → lowest index


@pytest.mark.parametrize("layer", [1, 2])
def test_one_stage_keeps_what_layer_k_itself_attends_to(model, layer):
    """Before layer K nothing is pruned, so layer K's own attention is the unpruned model's layer-K attention."""
    ids, am = left_pad([PROMPTS[0]])
    pix = _pix(1)
    att = eager_forward(model, input_ids=ids, attention_mask=am, pixel_values=pix).attentions
    img = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    scores = att[layer][0, :, -1, img].mean(0)
    want = sorted(img[scores.topk(4).indices].tolist())
    other = sorted(img[att[layer - 1][0, :, -1, img].mean(0).topk(4).indices].tolist())
    with torch.no_grad(), vtok.wrapped(model, "pdrop", 4, layer=layer):
        model(input_ids=ids, attention_mask=am, pixel_values=pix)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    assert sorted(set(kept) & set(img.tolist())) == want
    assert want != other or layer == 1  # the test tells the two layers apart (layer 2 does on these weights)


def test_pyramid_second_stage_ranks_on_the_pruned_sequence(model):
    """Stage 2 (layer 3) reads layer 3's attention over the sequence stage 1 left: the same as running stage 1 alone
    and reading layer 3's attention weights over the kept tokens."""
    ids, am = left_pad([PROMPTS[0]])
    pix = _pix(1)
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=pix)
    with vtok.wrapped(model, "pdrop", 8, layer=1):
        att = eager_forward(model, **inputs).attentions
        kept1 = vtok.stats(model)["per_sample"][0]["kept"]
    assert len(att) == len(model.model.language_model.layers)  # the probe of layer 1 leaves no trace in the output
    img = sorted(set(kept1) & set((ids[0] == IMAGE_TOKEN).nonzero().squeeze(1).tolist()))
    assert len(img) == 8
    pos = torch.tensor([kept1.index(p) for p in img])  # their places in the pruned sequence
    top = att[3][0, :, -1, pos].mean(0).topk(4).indices
    want = sorted(torch.tensor(img)[top].tolist())
    with torch.no_grad(), vtok.wrapped(model, "pdrop", [8, 4], layer=[1, 3]):
        model(**inputs)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    assert sorted(set(kept) & set(img)) == want


def _layerwise_logits(model, ids, pix, stages, n_prompt):
    """No cache, every token recomputed: from each stage's layer on, only that stage's kept prompt tokens plus the
    generated ones, with the original position ids. ``stages``: ``[(layer, kept prompt positions), ...]``."""
    from tests.hf.test_hf_wrap import _image_features

    lm = model.model.language_model
    with torch.no_grad():
        h = lm.get_input_embeddings()(ids)
        h[ids == IMAGE_TOKEN] = torch.cat(_image_features(model, pix))
        pos = torch.arange(ids.shape[1])[None]
        at = dict(stages)
        for i, layer_mod in enumerate(lm.layers):
            if i in at:
                keep = torch.tensor(at[i] + list(range(n_prompt, ids.shape[1])))
                sel = (pos[0][:, None] == keep[None]).any(1)
                h, pos = h[:, sel], pos[:, sel]
            h = layer_mod(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        return model.lm_head(lm.norm(h))


def test_cached_generate_equals_layerwise_recompute(model):
    ids, am = left_pad([PROMPTS[0]])
    pix = _pix(1)
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=pix)
    with torch.no_grad():
        with vtok.wrapped(model, "pdrop", 8, layer=1):
            model(**inputs)
            kept1 = vtok.stats(model)["per_sample"][0]["kept"]
        with vtok.wrapped(model, "pdrop", [8, 4], layer=[1, 3]):
            gen = model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
            kept2 = vtok.stats(model)["per_sample"][0]["kept"]
    assert set(kept2) < set(kept1)
    seq = ids
    for t in range(12):
        nxt = _layerwise_logits(model, seq, pix, [(1, kept1), (3, kept2)], ids.shape[1])[0, -1].argmax()
        assert int(nxt) == int(gen[t]), f"token {t}"
        seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_keep_all_is_identity(model):
    ids, am = left_pad(PROMPTS)
    pix = _pix(3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        with vtok.wrapped(model, "pdrop", [1.0, 1.0], layer=[1, 3]):
            out = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
    assert (out - ref).abs().max() <= 1e-5
