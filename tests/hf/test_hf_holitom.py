"""HoliTom's inner-LLM merge through ``vtok.wrap`` on a tiny LLaVA: the stage against FastV's score from eager
attention and a hand merge, and cached generation against a layer-by-layer recompute with the merged tokens."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_reference import assert_recomputed_tokens
from tests.helpers.hf_tiny import IMAGE_TOKEN, eager_forward, tiny_llava
from tests.hf.test_hf_sparsevlm import _layerwise_logits, _sample

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6)


def _by_hand(model, inp, k: int, layer: int):
    out = eager_forward(model, **inp, output_hidden_states=True)
    img = (inp["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(1)
    att = out.attentions[layer - 1][0].mean(0)[-1, img]  # the last token's row, heads averaged
    tokens = out.hidden_states[layer][0][img][None]
    return vtok.get_method("holitom_llm").fn(tokens, k, vtok.Context.build(tokens, {"text_attn": att[None]})), img


def test_cached_generate_equals_layerwise_recompute(model):
    inp = _sample(6)
    k, layer = 5, 2
    sel, img = _by_hand(model, inp, k, layer)
    assert sel.merges and bool((sel.assign[0] >= 0).all())  # every token lands somewhere
    ids = inp["input_ids"]
    with torch.no_grad(), vtok.wrapped(model, "holitom_llm", k, layer=layer):
        gen = model.generate(**inp, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    assert [p for p in kept if p in set(img.tolist())] == img[sel.keep[0]].tolist()
    assert_recomputed_tokens(gen, ids, lambda seq: _layerwise_logits(model, seq, inp["pixel_values"], layer, sel, img),
                             12)
