"""vtok.wrap on a tiny random-weight Gemma 3 (built from configs, no downloads): pooled vision context, the
bidirectional image mask after pruning, sliding-window refusal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
import vtok  # noqa: E402
from tests.helpers.hf_reference import (  # noqa: E402
    assert_batch_equals_one_by_one,
    assert_keep_all_is_identity,
    assert_unwrap_bit_exact,
    greedy,
)
from tests.helpers.hf_tiny import _one_thread, image_features  # noqa: E402, F401  (_one_thread: autouse)
from vtok.hooks.hf import stats  # noqa: E402
from vtok.hooks.hf.tiny import IMAGE_TOKEN, left_pad, tiny_inputs, tiny_model  # noqa: E402
from vtok.hooks.hf.tiny.gemma3 import BOI, EOI, TOKENS, pixels  # noqa: E402

KEEP = 0.25  # of the pre-LLM reference test


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_model("gemma3", attn=request.param)


def _prompt(before: list[int], n_images: int, after: list[int]) -> list[int]:
    ids = list(before)
    for _ in range(n_images):
        ids += [BOI] + [IMAGE_TOKEN] * TOKENS + [EOI, 7]
    return ids + list(after)


def _inputs(rows: list[list[int]], n_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE_TOKEN).long()}
    return out | ({"pixel_values": pixels(n_images, seed)} if n_images else {})


def _batch():
    """3 left-padded prompts: one image, two images (e.g. an image and its pan-and-scan crop), text only."""
    rows = [_prompt([1, 5, 9], 1, [11, 12]), _prompt([3], 2, [11, 12, 13, 14]), [4, 5, 6, 7, 8]]
    return rows, _inputs(rows, 3)


def _received_reference(m, pix) -> torch.Tensor:
    """``[n, 16]``: the attention each patch receives in the tower's last layer (eager attention weights of the
    unwrapped tower: mean over heads and query rows), averaged over each token's 2 x 2 patches."""
    tower = m.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = tower(pixel_values=pix, output_attentions=True).attentions[-1]  # [n, H, 64, 64]
    finally:
        tower.config._attn_implementation = impl
    recv = att.float().mean((1, 2)).reshape(-1, 1, 8, 8)
    return F.avg_pool2d(recv, 2).reshape(len(pix), -1)


def _reference_inputs(m, inp, keep_cols: list[int]):
    """The pruned prompt built by hand from the unwrapped model's pieces: ``inputs_embeds [1, L', D]`` (text
    embeddings, the image features scattered in, the kept columns), ``token_type_ids``."""
    ids = inp["input_ids"]
    with torch.no_grad():
        feats = image_features(m.model.get_image_features(inp["pixel_values"]))
        x = m.model.get_input_embeddings()(ids.masked_fill(ids == IMAGE_TOKEN, 0))
        x[ids == IMAGE_TOKEN] = feats.reshape(-1, x.shape[-1]).to(x.dtype)
    cols = torch.tensor(keep_cols)
    return x[:, cols], inp["token_type_ids"][:, cols]


def _greedy(m, x, tt, pos, n=16):
    """Greedy tokens of the unwrapped model on ``inputs_embeds`` without a cache (the model builds its own
    bidirectional mask from ``token_type_ids``); positions continue from ``pos``."""
    emb = m.model.get_input_embeddings()
    toks, first = [], None
    for _ in range(n):
        with torch.no_grad():
            logits = m(inputs_embeds=x, token_type_ids=tt, position_ids=pos, use_cache=False,
                       attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).logits
        first = logits if first is None else first
        t = int(logits[0, -1].argmax())
        toks.append(t)
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
        tt = torch.cat([tt, torch.zeros(1, 1, dtype=tt.dtype)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return first, toks


# ---------------------------------------------------------------------------------------------------- tests
def test_registered():
    assert "Gemma3ForConditionalGeneration" in vtok.hooks.hf.supported()


@pytest.mark.parametrize("layer", [None, 1, 2])
def test_keep_all_is_identity(model, layer):
    """Keep-all before the language model, and inside it (the stage's own mask must be the model's bidirectional
    one: a causal mask would change the logits)."""
    assert_keep_all_is_identity(model, _batch()[1], layer)


def test_bidirectional_mask_matters(model):
    """Sanity of the identity test: the same model without ``token_type_ids`` (causal image tokens) differs."""
    _, inp = _batch()
    with torch.no_grad():
        a = model(**inp).logits
        b = model(**{k: v for k, v in inp.items() if k != "token_type_ids"}).logits
    assert (a - b).abs().max() > 1e-3


def test_records_and_pooled_cls_attn(model):
    _, inp = _batch()
    with vtok.wrapped(model, "cls_attn", 0.5), torch.no_grad():
        model(**inp)
        recs = model._vtok_runtime.records
    assert [(r.n, r.grid, r.image) for r in recs] == [(TOKENS, (4, 4), i) for i in range(3)]
    ref = _received_reference(model, inp["pixel_values"])
    torch.testing.assert_close(torch.stack([r.ctx["cls_attn"] for r in recs]), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_pre_llm_equals_manual_reference(model, positions):
    """``cls_attn`` keeps the top quarter of each image by the pooled received attention (recomputed independently
    from the tower's own attention weights); the reference feeds the unwrapped model the pruned embeddings with
    ``token_type_ids`` at the kept tokens (so the model's own bidirectional mask) and the method's positions."""
    rows = [_prompt([1, 5], 2, [11, 12, 13])]
    inp = _inputs(rows, 2, seed=1)
    ids = inp["input_ids"][0].tolist()
    ref_attn = _received_reference(model, inp["pixel_values"])
    cols, img, i = [], 0, 0
    while i < len(ids):
        if ids[i] != IMAGE_TOKEN:
            cols.append(i)
            i += 1
            continue
        _, sel = vtok.compress(torch.zeros(1, TOKENS, 8), "cls_attn", KEEP, cls_attn=ref_attn[img][None])
        cols += [i + r for r in sel.emitted_keep()[0].tolist()]
        i += TOKENS
        img += 1
    x, tt = _reference_inputs(model, inp, cols)
    pos = torch.tensor([cols]) if positions == "original" else torch.arange(len(cols))[None]
    ref_logits, ref_tokens = _greedy(model, x, tt, pos)
    with vtok.wrapped(model, "cls_attn", KEEP, positions=positions):
        with torch.no_grad():
            out = model(**inp).logits
        assert stats(model)["per_sample"][0]["kept"] == cols
        tokens = greedy(model, inp)
    torch.testing.assert_close(out, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens[0].tolist() == ref_tokens


@pytest.mark.parametrize("method,layer,keep", [("visionzip", None, 0.5), ("tome", None, 0.5), ("fastv", 2, 0.5),
                                                ("divprune", [None, 2], [0.5, 0.25]), ("pdrop", [1, 3], [0.5, 0.25])])
def test_cached_generate_equals_uncached(model, method, layer, keep):
    _, inp = _batch()
    with vtok.wrapped(model, method, keep, layer=layer):
        assert torch.equal(greedy(model, inp, n=8), greedy(model, inp, n=8, use_cache=False))


@pytest.mark.parametrize("method,layer,keep", [("visionzip", None, 0.5), ("fastv", 2, 0.5),
                                                ("divprune", [None, 2], [0.5, 0.25]),
                                                ("sparsevlm", [1, 3], [0.5, 0.25])])
def test_batch_equals_one_by_one(model, method, layer, keep):
    rows, inp = _batch()
    ones, start = [], 0
    for r, n in zip(rows, [1, 2, 0], strict=True):
        ones.append(_inputs([r], 0))
        if n:
            ones[-1]["pixel_values"] = inp["pixel_values"][start:start + n]
        start += n
    with vtok.wrapped(model, method, keep, layer=layer):
        assert_batch_equals_one_by_one(model, inp, ones)


def test_stats(model):
    _, inp = _batch()
    with vtok.wrapped(model, "divprune", 0.25), torch.no_grad():
        model(**inp)
        st = stats(model)
    assert [(d["visual_before"], d["visual_after"]) for d in st["per_sample"]] == [(16, 4), (32, 8), (0, 0)]
    assert [(d["image"], d["before"], d["after"]) for d in st["per_image"]] == [(0, 16, 4), (1, 16, 4), (2, 16, 4)]
    assert st["prefill_tokens_before"] - st["prefill_tokens_after"] == 36


def test_unwrap_is_bit_exact(model):
    _, inp = _batch()
    assert_unwrap_bit_exact(model, inp, [("fastv", 0.5, 1, lambda m: greedy(m, inp, n=6)),
                                         ("visionzip", 0.25, None, lambda m: greedy(m, inp, n=6))])
    assert "get_image_features" not in vars(model.model)
    assert not model.model._forward_pre_hooks
    assert "forward" not in vars(model)  # transformers 4.x: the loss wrapper


def test_sliding_window_in_llm_refused_pre_llm_runs():
    """A window shorter than the sequence: an in-LLM stage is refused, a pre-LLM one runs (keep-all = identity)."""
    m = tiny_model("gemma3", window=8)
    _, inp = _batch()
    with vtok.wrapped(m, "fastv", 0.5, layer=2), pytest.raises(NotImplementedError, match="sliding window"):
        with torch.no_grad():
            m(**inp)
    with torch.no_grad():
        ref = m(**inp).logits
    with vtok.wrapped(m, "random", 1.0), torch.no_grad():
        torch.testing.assert_close(m(**inp).logits, ref, atol=1e-5, rtol=1e-5)
    with vtok.wrapped(m, "divprune", 0.5):
        assert torch.equal(greedy(m, inp, n=8), greedy(m, inp, n=8, use_cache=False))


def test_tiny_inputs_carry_token_types():
    m = tiny_model("gemma3")
    inp = tiny_inputs(m, [1, 2, 0])
    assert torch.equal(inp["token_type_ids"], (inp["input_ids"] == IMAGE_TOKEN).long())
