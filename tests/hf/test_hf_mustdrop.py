"""MustDrop's decode stage through ``vtok.wrap`` (``decode_kv="final"``): after the prefill the KV cache of the layers
from the first stage's attention layer up to the last stage holds only the final tokens — checked on the cache
itself, against a layer-by-layer recompute with per-layer masks built by hand, and batch against one by one."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_tiny import IMAGE_TOKEN, image_features, left_pad, llava_prompt, tiny_llava

pytest.importorskip("transformers")

ROWS = [llava_prompt([1, 5, 9], 1, [11, 12, 13, 14, 15, 16]), llava_prompt([3], 2, [11, 12]), [4, 5, 6]]
KEEP, LAYERS = [8, 4], [2, 4]  # retro layers 1, 2, 3


@pytest.fixture(scope="module")
def model():
    return tiny_llava(layers=6)


def _pix(n, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _kept(model, ids, am, pix, keep, layer, **kw):
    with torch.no_grad(), vtok.wrapped(model, "mustdrop_llm", keep, layer=layer, **kw):
        out = model(input_ids=ids, attention_mask=am, pixel_values=pix, use_cache=True)
        return [d["kept"] for d in vtok.stats(model)["per_sample"]], out.past_key_values


def test_cache_holds_the_final_tokens(model):
    ids, am = left_pad(ROWS[:1])
    pix = _pix(1)
    (final,), staged = _kept(model, ids, am, pix, KEEP, LAYERS, decode_kv="stage")
    (first,), _ = _kept(model, ids, am, pix, KEEP[0], LAYERS[0])
    _, pruned = _kept(model, ids, am, pix, KEEP, LAYERS)  # mustdrop_llm's default: "final"
    assert vtok.get_method("mustdrop_llm").placement.decode_kv == "final"
    every = list(range(ids.shape[1]))
    for i in range(6):
        held = every if i < LAYERS[0] else first if i < LAYERS[1] else final  # what layer i computed on
        rows = [held.index(p) for p in final] if i in (1, 2, 3) else list(range(len(held)))
        for name in ("keys", "values"):
            want = getattr(staged.layers[i], name)[:, :, rows]
            assert torch.equal(getattr(pruned.layers[i], name), want), (i, name)


def _manual_generate(model, ids, pix, first, final, steps):
    """Greedy tokens by full recomputation: layer ``i`` runs on its stage's prompt tokens plus the generated ones;
    generated queries in layers 1–3 see only the final prompt tokens (prompt queries see their stage's)."""
    lm = model.model.language_model
    n_prompt = ids.shape[1]
    seq, out = ids, []
    for _ in range(steps):
        emb = lm.get_input_embeddings()(seq)
        emb[seq == IMAGE_TOKEN] = torch.cat(list(image_features(model.model.get_image_features(pixel_values=pix))))
        gen = list(range(n_prompt, seq.shape[1]))
        rows, h = list(range(n_prompt)) + gen, emb
        for i, layer_mod in enumerate(lm.layers):
            held = list(range(n_prompt)) if i < LAYERS[0] else first if i < LAYERS[1] else final
            new_rows = held + gen
            if new_rows != rows:
                h, rows = h[:, [rows.index(r) for r in new_rows]], new_rows
            pos = torch.tensor([rows])
            ok = pos[0][None, :] <= pos[0][:, None]  # causal by position (rows ascend)
            if i in (1, 2, 3):
                seen = torch.tensor([r in final or r >= n_prompt for r in rows])
                ok &= ~(pos[0][:, None] >= n_prompt) | seen[None, :]
            mask = torch.zeros(ok.shape).masked_fill(~ok, float("-inf"))[None, None]
            h = layer_mod(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos), position_ids=pos)
        nxt = model.lm_head(lm.norm(h))[0, -1].argmax()
        out.append(int(nxt))
        seq = torch.cat([seq, nxt.view(1, 1)], 1)
    return out


def test_cached_generate_equals_recompute_with_final_kv(model):
    ids, am = left_pad(ROWS[:1])
    pix = _pix(1)
    (final,), _ = _kept(model, ids, am, pix, KEEP, LAYERS)
    (first,), _ = _kept(model, ids, am, pix, KEEP[0], LAYERS[0])
    with torch.no_grad():
        with vtok.wrapped(model, "mustdrop_llm", KEEP, layer=LAYERS):
            got = model.generate(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=8,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
        scores = {}
        for kv in ("stage", "final"):
            with vtok.wrapped(model, "mustdrop_llm", KEEP, layer=LAYERS, decode_kv=kv):
                scores[kv] = model.generate(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=2,
                                            do_sample=False, output_scores=True, return_dict_in_generate=True).scores
        want = _manual_generate(model, ids, pix, first, final, 8)
    assert got == want
    assert torch.equal(scores["stage"][0], scores["final"][0])  # the prefill is the same
    assert not torch.allclose(scores["stage"][1], scores["final"][1])  # the decode step is not


def test_batch_equals_one_by_one(model):
    ids, am = left_pad(ROWS)
    pix = _pix(3, seed=2)
    images = {0: slice(0, 1), 1: slice(1, 3)}
    with torch.no_grad(), vtok.wrapped(model, "mustdrop_llm", KEEP, layer=LAYERS):
        gen = model.generate(input_ids=ids, attention_mask=am, pixel_values=pix, max_new_tokens=8, do_sample=False)
        for b, r in enumerate(ROWS):
            i1, a1 = left_pad([r])
            extra = {"pixel_values": pix[images[b]]} if b in images else {}
            one = model.generate(input_ids=i1, attention_mask=a1, max_new_tokens=8, do_sample=False, **extra)
            assert one[0, i1.shape[1]:].tolist() == gen[b, ids.shape[1]:].tolist()


def test_decode_kv_errors(model):
    with pytest.raises(ValueError, match="decode_kv"):
        vtok.wrap(model, "random", 0.5, layer=2, decode_kv="all")
    with pytest.raises(ValueError, match="no in-LLM stage"):
        vtok.wrap(model, "random", 0.5, decode_kv="final")
