"""``vtok.wrap`` on a tiny random-weight LLaVA (CLIP tower + Llama LM built from configs; no downloads).

Every pruned run is checked against an explicit reference computed here by hand: the kept image features placed in
``inputs_embeds`` with hand-made position ids and fed straight to the language model (pre-LLM), or the decoder layers
called one by one with the kept hidden states gathered at layer ``K`` (in-LLM).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtok
from tests.helpers.hf_reference import assert_recomputed_tokens, greedy_ids
from tests.helpers.hf_tiny import IMAGE_TOKEN, eager_forward, left_pad, llava_prompt, tiny_llava

pytest.importorskip("transformers")

N_IMG = 16  # 28 px / patch 7 → 4 × 4 patches


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _pix(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 28, 28, generator=g)


PROMPTS = [llava_prompt([1, 5, 9], 1, [11, 12, 13]), llava_prompt([3], 2, [11, 12, 13, 14, 15]), [4, 5, 6, 7]]


def _batch():
    ids, am = left_pad(PROMPTS)
    return ids, am, _pix(3)


def _one(i: int):
    ids, am = left_pad([PROMPTS[i]])
    start = sum(p.count(IMAGE_TOKEN) // N_IMG for p in PROMPTS[:i])
    n = PROMPTS[i].count(IMAGE_TOKEN) // N_IMG
    extra = {"pixel_values": _pix(3)[start:start + n]} if n else {}
    return ids, am, extra


_gen = greedy_ids  # tests/hf/test_hf_dart.py imports it from here


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("layer", [None, 2, [None, 1]])
def test_keep_all_is_identity(model, layer):
    ids, am, pix = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        keep = [1.0, 1.0] if isinstance(layer, list) else 1.0
        with vtok.wrapped(model, "divprune", keep, layer=layer):
            out = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
    assert out.shape == ref.shape
    assert (out - ref)[am.bool()].abs().max() <= 1e-5


def test_unwrap_is_bit_exact_and_double_wrap_refused(model):
    ids, am, pix = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        vtok.wrap(model, "random", 0.25)
        with pytest.raises(ValueError, match="already wrapped"):
            vtok.wrap(model, "random", 0.25)
        pruned = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        vtok.unwrap(model)
        out = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
    assert pruned.shape[1] < ref.shape[1]
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="not wrapped"):
        vtok.unwrap(model)


# ---------------------------------------------------------------------------------------------------- pre-LLM
def _image_features(model, pix) -> list[torch.Tensor]:
    """Projected features per image (transformers 5 returns an output with ``pooler_output``, 4.x a list)."""
    out = model.model.get_image_features(pixel_values=pix)
    return list(getattr(out, "pooler_output", out))


def _vision_context(model, pix):
    """CLS row (heads averaged) and per-head keys of the layer producing hidden_states[-2], by eager attention."""
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pix, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    encoder = getattr(tower, "vision_model", tower).encoder  # transformers 4.x nests the body in .vision_model
    depth = len(encoder.layers)
    li = (-2 % (depth + 1)) - 1
    cls_attn = out.attentions[li][:, :, 0, 1:].mean(1)
    layer = encoder.layers[li]
    k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[li]))
    keys = k.view(k.shape[0], k.shape[1], layer.self_attn.num_heads, -1).transpose(1, 2)[:, :, 1:]
    return cls_attn, keys


def _reference_sequence(model, ids, pix, method, keep, positions, options):
    """Batch-1 explicit reference: (inputs_embeds [1, L', D], position_ids [1, L'])."""
    lm = model.model.language_model
    feats = _image_features(model, pix)
    ctx = {}
    if method in ("visionzip", "tome"):  # they use the vision tower's attention / keys
        cls_attn, keys = _vision_context(model, pix)
    rows, pos = [], []
    emb = lm.get_input_embeddings()(ids[0])
    img_pos = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    i, seen = 0, 0
    while i < ids.shape[1]:
        if ids[0, i] != IMAGE_TOKEN:
            rows.append(emb[i])
            pos.append(i)
            i += 1
            continue
        f = feats[seen][None]
        if method == "visionzip":
            ctx = {"cls_attn": cls_attn[seen:seen + 1], "keys": keys[seen:seen + 1]}
        if method == "tome":
            ctx = {"keys": keys[seen:seen + 1]}
        out, sel = vtok.compress(f, method, keep, grid=(4, 4), **ctx, **options)
        rows.extend(out[0])
        pos.extend((i + sel.emitted_keep()[0]).tolist())
        i += N_IMG
        seen += 1
    assert len(img_pos) == seen * N_IMG
    x = torch.stack(rows)[None]
    p = torch.tensor(pos)[None] if positions == "original" else torch.arange(len(rows))[None]
    return x, p


def _lm_logits(model, x, p):
    h = model.model.language_model(inputs_embeds=x, position_ids=p).last_hidden_state
    return model.lm_head(h)


@pytest.mark.parametrize("positions", ["original", "reindex"])
@pytest.mark.parametrize("method,options", [("uniform", {}), ("random", {"seed": 3}), ("divprune", {}),
                                            ("visionzip", {}), ("tome", {}), ("pool2d", {})])
def test_pre_llm_equals_explicit_reference(model, method, options, positions):
    ids, am = left_pad([PROMPTS[1]])
    pix = _pix(2)
    keep = 0.25 if method != "visionzip" else 6
    with torch.no_grad():
        x, p = _reference_sequence(model, ids, pix, method, keep, positions, options)
        ref = _lm_logits(model, x, p)
        # greedy reference: no cache, the whole sequence every step
        toks = []
        for _ in range(16):
            nxt = _lm_logits(model, x, p)[0, -1].argmax()
            toks.append(int(nxt))
            x = torch.cat([x, model.model.language_model.get_input_embeddings()(nxt)[None, None]], 1)
            p = torch.cat([p, p[:, -1:] + 1], 1)
        with vtok.wrapped(model, method, keep, positions=positions, **options):
            out = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
            gen = greedy_ids(model, ids, am, pixel_values=pix)
            st = vtok.stats(model)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-4
    assert gen[0].tolist() == toks
    k = vtok.resolve_k(keep, N_IMG)
    assert [d["after"] for d in st["per_image"]] == [k, k]
    assert [d["after"] for d in st["per_image"]] == [vtok.retained_count(method, N_IMG, keep, grid=(4, 4))] * 2


def test_default_positions_follow_the_method(model):
    assert vtok.get_method("fastv").placement.positions == "original"
    assert vtok.get_method("divprune").placement.positions == "reindex"


# ---------------------------------------------------------------------------------------------------- in-LLM
def _layerwise_logits(model, ids, pix, layer, kept_prompt, n_prompt):
    """No cache, every token recomputed: layers < K see the whole sequence, layers >= K only the kept prompt tokens
    plus the generated ones, with the original position ids."""
    lm = model.model.language_model
    with torch.no_grad():
        emb = lm.get_input_embeddings()(ids)
        feats = torch.cat(_image_features(model, pix))
        emb[ids == IMAGE_TOKEN] = feats
        length = ids.shape[1]
        pos = torch.arange(length)[None]
        h = emb
        keep_idx = torch.tensor(kept_prompt + list(range(n_prompt, length)))
        for i, layer_mod in enumerate(lm.layers):
            if i == layer:
                h, pos = h[:, keep_idx], pos[:, keep_idx]
            cos_sin = lm.rotary_emb(h, pos)
            h = layer_mod(h, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        return model.lm_head(lm.norm(h))


@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart", "fitprune", "random", "divprune"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_in_llm_generate_equals_layerwise_recompute(model, method, use_cache):
    """The reference fixes the prompt's selection and recomputes every layer on the kept prompt plus the generated
    tokens; the cached and the uncached generate both give its tokens (the uncached one used to re-rank FastV /
    PyramidDrop by the last generated token's attention on every step)."""
    ids, am = left_pad([PROMPTS[0]])
    pix = _pix(1)
    n_prompt = ids.shape[1]
    with torch.no_grad(), vtok.wrapped(model, method, 0.25, layer=2):
        gen = greedy_ids(model, ids, am, pixel_values=pix, use_cache=use_cache)
        st = vtok.stats(model)
    kept = st["per_sample"][0]["kept"]
    assert st["per_sample"][0]["visual_after"] == 4
    assert st["prefill_tokens_before"] == n_prompt  # the prompt's stats, also after the uncached steps
    assert_recomputed_tokens(gen, ids, lambda seq: _layerwise_logits(model, seq, pix, 2, kept, n_prompt), 16)


def test_fastv_keeps_the_most_attended_tokens(model):
    """FastV's scores: the last prompt token's attention at layer K-1 (heads averaged), by eager attention."""
    ids, am = left_pad([PROMPTS[0]])
    pix = _pix(1)
    att = eager_forward(model, input_ids=ids, attention_mask=am, pixel_values=pix).attentions
    with torch.no_grad():
        img = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
        scores = att[1][0, :, -1, img].mean(0)
        want = sorted(img[scores.topk(4).indices].tolist())
        with vtok.wrapped(model, "fastv", 4, layer=2):
            model(input_ids=ids, attention_mask=am, pixel_values=pix)
            kept = vtok.stats(model)["per_sample"][0]["kept"]
    assert sorted(set(kept) & set(img.tolist())) == want


@pytest.mark.parametrize("method,layer", [("random", 2), ("divprune", [1, 3]), ("random", [None, 2]), ("fastv", 2),
                                          ("pdrop", [1, 3]), (["cdpruner", "fastv"], [None, 2])])
def test_in_llm_cached_equals_no_cache(model, method, layer):
    ids, am, pix = _batch()
    keep = [0.5, 0.25] if isinstance(layer, list) else 0.5
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        a = greedy_ids(model, ids, am, pixel_values=pix)
        b = greedy_ids(model, ids, am, pixel_values=pix, use_cache=False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- labels
def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy by hand: position ``t`` predicts label ``t + 1``, -100 ignored."""
    return F.cross_entropy(logits[0, :-1].float(), labels[1:], ignore_index=-100)


@pytest.mark.parametrize("layer", [None, 2])
def test_labels_loss_equals_the_explicit_reference(model, layer):
    """Issue 29: ``model(**inputs, labels=...)`` failed with a batch-size mismatch. The loss is over the pruned
    sequence: logits of the kept sequence built by hand (pre-LLM: kept features with their original positions;
    in-LLM: the layer-by-layer recompute), labels taken at the kept columns."""
    ids, am = left_pad([PROMPTS[1]])
    pix = _pix(2)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    labels[0, 1] = -100
    with torch.no_grad(), vtok.wrapped(model, "uniform", 0.25, layer=layer, positions="original"):
        out = model(input_ids=ids, attention_mask=am, pixel_values=pix, labels=labels)
        kept = vtok.stats(model)["per_sample"][0]["kept"]
    with torch.no_grad():
        if layer is None:
            x, p = _reference_sequence(model, ids, pix, "uniform", 0.25, "original", {})
            assert p[0].tolist() == kept
            ref_logits = _lm_logits(model, x, p)
        else:  # from layer K on only the kept columns
            ref_logits = _layerwise_logits(model, ids, pix, layer, kept, ids.shape[1])
    assert ref_logits.shape[1] == len(kept) < ids.shape[1]
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, _shifted_loss(ref_logits, labels[0, kept]), atol=1e-5, rtol=0)


def test_labels_train_through_the_pruned_sequence(model):
    """Fine-tuning with pruning: the loss backpropagates to the language model and the projector."""
    ids, am, pix = _batch()
    labels = ids.masked_fill(am == 0, -100)
    model.zero_grad()
    with vtok.wrapped(model, "divprune", [0.5, 0.25], layer=[None, 2]):
        loss = model(input_ids=ids, attention_mask=am, pixel_values=pix, labels=labels).loss
    loss.backward()
    grads = [model.lm_head.weight.grad, model.model.multi_modal_projector.linear_1.weight.grad]
    model.zero_grad()
    assert all(g is not None and bool(g.isfinite().all()) and float(g.abs().sum()) > 0 for g in grads)


# ---------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("method,layer", [("divprune", None), ("visionzip", None), ("fastv", 2), ("pdrop", [1, 3]),
                                          ("random", [None, 2]), ("sparsevlm", [1, 3])])
def test_batch_equals_one_by_one(model, method, layer):
    ids, am, pix = _batch()
    keep = [0.5, 0.25] if isinstance(layer, list) else 0.5
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        logits = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits[:, -1]
        gen = greedy_ids(model, ids, am, pixel_values=pix)
        for i in range(3):
            ids1, am1, extra = _one(i)
            one = model(input_ids=ids1, attention_mask=am1, **extra).logits[:, -1]
            assert (one[0] - logits[i]).abs().max() <= 1e-4
            assert greedy_ids(model, ids1, am1, **extra)[0].tolist() == gen[i].tolist()


def test_per_sample_keep(model):
    ids, am, pix = _batch()
    with torch.no_grad(), vtok.wrapped(model, "uniform", [4, 8, 2]):
        model(input_ids=ids, attention_mask=am, pixel_values=pix)
        st = vtok.stats(model)
    assert [d["visual_after"] for d in st["per_sample"]] == [4, 16, 0]
    assert [d["after"] for d in st["per_image"]] == [4, 8, 8]
    assert st["prefill_tokens_after"] == st["prefill_tokens_before"] - 12 - 16
    assert 0 < st["prefill_reduction"] < 1


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_input_errors(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        vtok.wrap(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=32)), "random", 0.5)
    with pytest.raises(ValueError, match="text_attn"):
        vtok.wrap(model, "fastv", 0.5)  # pre-LLM: no LLM attention yet
    with pytest.raises(ValueError, match="'attn'"):
        vtok.wrap(model, "zero_tprune", 0.5)  # needs the full attention graph, which the wrapper never builds
    with pytest.raises(ValueError, match="text_attn"):
        vtok.wrap(model, "fastv", 0.5, layer=0)
    with pytest.raises(ValueError, match="dart' runs inside the language model.*layer=K"):
        vtok.wrap(model, "dart", 0.5)  # the vision tower's keys are not layer K-1's
    with pytest.raises(ValueError, match="zero image tokens"):
        vtok.wrap(model, "random", 0.0)
    with pytest.raises(ValueError, match="zero image tokens"):
        vtok.wrap(model, "random", 0)
    with pytest.raises(ValueError, match="layer must be in"):
        vtok.wrap(model, "random", 0.5, layer=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        vtok.wrap(model, "random", [0.5, 0.25], layer=[2, 1])
    with pytest.raises(ValueError, match="must not grow"):
        vtok.wrap(model, "random", [0.25, 0.5], layer=[1, 2])
    with pytest.raises(ValueError, match="positions"):
        vtok.wrap(model, "random", 0.5, positions="left")
    with pytest.raises(TypeError, match="unknown option"):
        vtok.wrap(model, "random", 0.5, bogus=1)
    assert getattr(model, "_vtok_runtime", None) is None
    ids, am = left_pad([PROMPTS[0]])
    with vtok.wrapped(model, "random", 0.5), pytest.raises(NotImplementedError, match="beam"):
        model.generate(input_ids=ids, attention_mask=am, pixel_values=_pix(1), num_beams=2, max_new_tokens=2)
    with vtok.wrapped(model, "random", 0.5), pytest.raises(NotImplementedError, match="num_return_sequences"):
        model.generate(input_ids=ids, attention_mask=am, pixel_values=_pix(1), do_sample=True,
                       num_return_sequences=2, max_new_tokens=2)
    with vtok.wrapped(model, "random", 0.5), pytest.raises(NotImplementedError, match="cache"):
        model.generate(input_ids=ids, attention_mask=am, pixel_values=_pix(1), cache_implementation="static",
                       max_new_tokens=2)


def test_retained_count_errors():
    assert vtok.retained_count("divprune", 576, 0.25) == 144
    assert vtok.retained_count("random", 600, 0.25, protected=24) == 144 + 24
    with pytest.raises(ValueError, match="grid"):
        vtok.retained_count("pool2d", 576, 0.25)
    with pytest.raises(ValueError, match="unknown method"):
        vtok.retained_count("nope", 576, 0.25)


# ---------------------------------------------------------------------------------------------------- every method
def _placement(model, m):
    from vtok.hooks.hf import _LLM_CONTEXT, _adapter, placement_error

    if m.needs <= _adapter(model).provides(model) and placement_error(m.name, None) is None:
        return None
    if m.needs <= _LLM_CONTEXT:
        return 2
    return "unsupported"


@pytest.mark.parametrize("name", [m.name for m in vtok.methods()])
def test_every_method_through_the_wrapper(model, name):
    """Each registered method where the wrapper can place it: keep-all identity, exact budgets, cached == no-cache
    generation (MustDrop's decode stage prunes the cache: ``decode_kv="stage"`` for it here), batch == one by one;
    methods needing context no placement gives (Zero-TPrune's full attention graph) are refused."""
    m = vtok.get_method(name)
    layer = _placement(model, m)
    if layer == "unsupported":
        with pytest.raises(ValueError, match="needs context"):
            vtok.wrap(model, name, 0.5)
        return
    ids, am, pix = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        with vtok.wrapped(model, name, 1.0, layer=layer):
            assert (model(input_ids=ids, attention_mask=am, pixel_values=pix).logits - ref).abs().max() <= 1e-5
    kw = {"decode_kv": "stage"} if m.placement.decode_kv == "final" else {}
    with torch.no_grad(), vtok.wrapped(model, name, 0.5, layer=layer, **kw):
        a = greedy_ids(model, ids, am, n=6, pixel_values=pix)
        assert [d["after"] for d in vtok.stats(model)["per_image"]] == [8, 8, 8]
        b = greedy_ids(model, ids, am, n=6, pixel_values=pix, use_cache=False)
        ids1, am1, extra = _one(1)
        one = greedy_ids(model, ids1, am1, n=6, **extra)
    assert torch.equal(a, b)
    assert one[0].tolist() == a[1].tolist()


def test_eager_attention_language_model():
    """With attn_implementation='eager' the in-LLM stages build additive masks themselves: same guarantees."""
    model = tiny_llava(attn="eager")
    ids, am, pix = _batch()
    with torch.no_grad(), vtok.wrapped(model, "fastv", 0.5, layer=2):
        a = greedy_ids(model, ids, am, n=8, pixel_values=pix)
        b = greedy_ids(model, ids, am, n=8, pixel_values=pix, use_cache=False)
        for i in range(3):
            ids1, am1, extra = _one(i)
            assert greedy_ids(model, ids1, am1, n=8, **extra)[0].tolist() == a[i].tolist()
    assert torch.equal(a, b)


def test_one_method_per_stage(model):
    """``method`` as a list: each stage runs its own method with its own options; a repeated name equals the name."""
    ids, am, pix = _batch()
    with torch.no_grad():
        with vtok.wrapped(model, "random", [0.5, 0.25], layer=[None, 2], seed=3):
            a = model(input_ids=ids, attention_mask=am, pixel_values=pix).logits
        with vtok.wrapped(model, ["random", "random"], [0.5, 0.25], layer=[None, 2], seed=3):
            assert torch.equal(model(input_ids=ids, attention_mask=am, pixel_values=pix).logits, a)
        with vtok.wrapped(model, "divprune", 0.5):
            model(input_ids=ids, attention_mask=am, pixel_values=pix)
            pre = [set(d["kept"]) for d in vtok.stats(model)["per_sample"]]
        with vtok.wrapped(model, ["divprune", "fastv"], [0.5, 0.25], layer=[None, 2], query_source="last"):
            model(input_ids=ids, attention_mask=am, pixel_values=pix)
            st = vtok.stats(model)
    assert [d["after"] for d in st["per_image"]] == [4, 4, 4]
    # the second stage picks among the first one's tokens (kept columns index the unpruned prompt)
    assert all(set(d["kept"]) <= p for d, p in zip(st["per_sample"], pre, strict=True))
    with pytest.raises(ValueError, match="2 names but there are 3 stages"):
        vtok.wrap(model, ["divprune", "fastv"], [0.5, 0.25, 0.1], layer=[None, 2, 3])
    with pytest.raises(TypeError, match="method must be"):
        vtok.wrap(model, ["divprune", 3], [0.5, 0.25], layer=[None, 2])
    with pytest.raises(TypeError, match="unknown option"):
        vtok.wrap(model, ["divprune", "fastv"], [0.5, 0.25], layer=[None, 2], sead=1)
    with pytest.raises(ValueError, match="method 'fastv' needs context"):
        vtok.wrap(model, ["fastv", "random"], [0.5, 0.25], layer=[None, 2])
