"""SparseVLM through ``vtok.wrap`` on a tiny LLaVA: the wrapper's rater context against eager attention and the input
embeddings by hand, and cached generation against a layer-by-layer recompute with the recycled clusters merged by
hand."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_reference import assert_recomputed_tokens
from tests.helpers.hf_tiny import IMAGE_TOKEN, eager_forward, image_features, left_pad, llava_prompt, tiny_llava
from vtok.pruners.sparsevlm import text_relevance

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6)


def _sample(seed: int = 0):
    ids, am = left_pad([llava_prompt([1, 5, 9], 1, [11, 12, 13, 14, 15, 16])])
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": am, "pixel_values": pix}


def _by_hand(model, inp, k: int, layer: int):
    """The stage computed from an unwrapped eager forward: ``(selection, image positions)``."""
    out = eager_forward(model, **inp, output_hidden_states=True)
    ids = inp["input_ids"][0]
    img = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    text = torch.arange(int(img.max()) + 1, len(ids))
    emb, hid = out.hidden_states[0][0], out.hidden_states[layer][0]  # the LM's input; the input of layer K
    att = out.attentions[layer - 1][0].mean(0)  # layer K-1, heads averaged
    ctx = {"text_rows_attn": att[text][:, img][None], "text_relevance": text_relevance(emb[img], emb[text])[None]}
    tokens = hid[img][None]
    return vtok.get_method("sparsevlm").fn(tokens, k, vtok.Context.build(tokens, ctx)), img


@pytest.mark.parametrize("k,layer", [(9, 2), (5, 4), (12, 1)])
def test_stage_equals_the_context_by_hand(model, k, layer):
    inp = _sample(4)
    sel, img = _by_hand(model, inp, k, layer)
    assert sel.merges
    with torch.no_grad(), vtok.wrapped(model, "sparsevlm", k, layer=layer):
        model(**inp)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    # the kept tokens by position, then the cluster tokens at their centres' positions, in emission order
    assert [p for p in kept if p in set(img.tolist())] == img[sel.emitted_keep()[0]].tolist()


def test_keep_all_is_identity(model):
    inp = _sample(1)
    with torch.no_grad():
        ref = model(**inp).logits
        with vtok.wrapped(model, "sparsevlm", 1.0, layer=2):
            assert torch.equal(model(**inp).logits, ref)


def _layerwise_logits(model, seq, pix, layer, sel, img):
    """No cache: layers < K see every token; at K the image's tokens become ``sel.apply`` of the hidden states (kept
    tokens, then the cluster means) with their emitted positions' original position ids."""
    lm = model.model.language_model
    emb = lm.get_input_embeddings()(seq)
    feats = image_features(model.model.get_image_features(pixel_values=pix))
    emb[seq == IMAGE_TOKEN] = torch.cat(list(feats))
    h, pos = emb, torch.arange(seq.shape[1])[None]
    a, b = int(img.min()), int(img.max()) + 1
    for i, layer_mod in enumerate(lm.layers):
        if i == layer:
            h = torch.cat([h[:, :a], sel.apply(h[:, a:b]), h[:, b:]], 1)
            pos = torch.cat([pos[:, :a], img[sel.emitted_keep()[0]][None], pos[:, b:]], 1)
        h = layer_mod(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
    return model.lm_head(lm.norm(h))


def test_cached_generate_equals_layerwise_recompute(model):
    inp = _sample(2)
    k, layer = 6, 2
    sel, img = _by_hand(model, inp, k, layer)
    a = sel.assign[0]
    assert int(torch.bincount(a[a >= 0]).max()) > 1  # at least one real cluster
    ids = inp["input_ids"]
    with torch.no_grad(), vtok.wrapped(model, "sparsevlm", k, layer=layer):
        gen = model.generate(**inp, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    assert_recomputed_tokens(gen, ids, lambda seq: _layerwise_logits(model, seq, inp["pixel_values"], layer, sel, img),
                             12)


def test_multi_stage_counts(model):
    inp = _sample(3)
    with torch.no_grad(), vtok.wrapped(model, "sparsevlm", [12, 8, 4], layer=[1, 3, 4]):
        model(**inp)
        assert vtok.stats(model)["per_sample"][0]["visual_after"] == 4
    with pytest.raises(ValueError, match="needs context"):
        vtok.wrap(model, "sparsevlm", 0.5, layer=0)  # nothing ran before layer 0: no attention to read


def test_mustdrop_prefill_stage_equals_their_filter_by_hand(model):
    """MustDrop's prefill stage reads the same ``text_rows_attn``: at their count it keeps exactly their set."""
    from vtok.pruners.mustdrop import mustdrop_llm_budget

    inp = _sample(5)
    att = eager_forward(model, **inp).attentions
    ids = inp["input_ids"][0]
    img = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    text = torch.arange(int(img.max()) + 1, len(ids))
    rows = att[2][0].mean(0)[text][:, img]  # layer K-1 = 2, heads averaged
    share, peak = rows.sum(0) / rows.sum(), rows.max(0).values
    # thresholds between the 8th and 9th smallest values (random weights spread attention evenly; their 0.001 keeps all)
    g, i = (float(v.sort().values[7:9].mean()) for v in (share, peak))
    want = img[(share >= g) | (peak >= i)].tolist()
    assert mustdrop_llm_budget(rows[None], g, i) == len(want) and 0 < len(want) < 16
    with torch.no_grad(), vtok.wrapped(model, "mustdrop_llm", len(want), layer=3, global_thr=g, individual_thr=i):
        model(**inp)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    assert [p for p in kept if p in set(img.tolist())] == want
