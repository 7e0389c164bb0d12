"""CDPruner's two representations and DART's pivot order against explicit transcriptions of the authors' arithmetic
(written here from their description, never their code) on seeded random inputs at N = 576 (issue #30, points 2 and
3), and through ``vtok.wrap`` on a tiny LLaVA.

* CDPruner (Theia-4869/CDPruner, ``encode_images``): similarity from the projector's output, relevance from CLIP's
  image embeddings ``visual_projection(post_layernorm(h))`` against CLIP text embeddings, negated, min–max
  normalised, then their fast greedy MAP loop.
* DART (``get_retained_image_token``): pivots = the 4 image / 4 instruction tokens of largest key L1 norm, visited in
  the order of a real Python ``set`` of their sequence indices, each taking ``keep // 8`` least cosine-similar image
  tokens; image pivots kept on top.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import vtok
from tests.helpers.hf_tiny import (
    IMAGE_TOKEN,
    _one_thread,  # noqa: F401  (autouse: one intra-op thread per module)
    left_pad,
    llava_prompt,
    tiny_llava,
)
from vtok.pruners.dart import cpython_set_order

N = 576
SEEDS = range(100)


# ------------------------------------------------------------------------------------------------------- CDPruner
def _cdpruner_authors(proj: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, t: int,
                      sign: float = -1.0) -> list[int]:
    """Their ``encode_images`` for one image (B = 1): ``proj [N, Dp]`` = ``mm_projector(h)``, ``image_embeds [N, C]``
    = ``visual_projection(post_layernorm(h))``, ``text_embeds [M, C]`` (one per 77-token text segment); ``t`` tokens.
    ``sign=-1`` is their ``(-relevance).mean``. Returns the picks sorted."""
    n = proj.shape[0]
    image_normalized = proj / proj.norm(dim=-1, keepdim=True)
    similarity = image_normalized @ image_normalized.T
    ie = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    te = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (sign * (ie @ te.T)).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    cis = torch.zeros(t, n, dtype=kernel.dtype)
    di2s = kernel.diagonal().clone()
    picks = []
    for i in range(t):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis * eis
        di2s[j] = float("-inf")
    return sorted(picks)


def _clip_llava_features(seed: int, dv: int = 64, dp: int = 256, c: int = 48):
    """A LLaVA-like draw: patch features ``h [N, dv]`` (CLIP layer −2), their projection by a random 2-layer GELU MLP
    (``mm_projector``, width ``dp``), CLIP's image embeddings (a random LayerNorm = ``post_layernorm``, then a bias-free
    ``visual_projection`` to ``c``) and 1–3 CLIP text-segment embeddings."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    h = torch.randn(N, dv, **kw) * (1 + 2 * torch.rand(N, 1, **kw)) + torch.randn(dv, **kw)
    w1, w2 = torch.randn(dv, dp, **kw) / dv ** 0.5, torch.randn(dp, dp, **kw) / dp ** 0.5
    proj = F.gelu(h @ w1 + 0.1 * torch.randn(dp, **kw)) @ w2
    ln = F.layer_norm(h, (dv,), 1 + 0.1 * torch.randn(dv, **kw), 0.1 * torch.randn(dv, **kw))
    image_embeds = ln @ (torch.randn(dv, c, **kw) / dv ** 0.5)
    text_embeds = torch.randn(1 + seed % 3, c, **kw)
    return proj, image_embeds, text_embeds


def test_cdpruner_equals_the_authors_two_representations():
    """``compress(projected, "cdpruner", k, relevance_features=clip_image_embeds, query=clip_text_embeds)`` is their
    ``encode_images``: 100 of 100 draws at N = 576 (budgets 32–192). Relevance on one representation instead (the
    only call vtok allowed before) picks another set in most draws."""
    one_rep = 0
    for seed in SEEDS:
        proj, image_embeds, text_embeds = _clip_llava_features(seed)
        k = (32, 64, 128, 192)[seed % 4]
        want = _cdpruner_authors(proj, image_embeds, text_embeds, k)
        _, sel = vtok.compress(proj[None], "cdpruner", k, relevance_features=image_embeds[None],
                               query=text_embeds[None])
        assert sel.keep[0].tolist() == want, seed
        _, old = vtok.compress(image_embeds[None], "cdpruner", k, query=text_embeds[None], relevance_sign="negative")
        one_rep += old.keep[0].tolist() == want
    assert one_rep <= 10


def test_cdpruner_auto_sign_and_the_substitute():
    """``relevance_sign="auto"``: with ``relevance_features`` the code's negated relevance (above); with one
    representation (tokens and query in one space: ``vtok.wrap``'s substitute) the paper's positive cosine."""
    for seed in range(20):
        proj, image_embeds, _ = _clip_llava_features(seed)
        query = torch.randn(2, proj.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        k = 64
        want = _cdpruner_authors(proj, proj, query, k, sign=1.0)
        assert vtok.compress(proj[None], "cdpruner", k, query=query[None])[1].keep[0].tolist() == want
        want = _cdpruner_authors(proj, image_embeds, query[:, :48], k, sign=1.0)
        got = vtok.compress(proj[None], "cdpruner", k, relevance_features=image_embeds[None], query=query[None, :, :48],
                            relevance_sign="positive")[1].keep[0].tolist()
        assert got == want


def test_cdpruner_relevance_features_context_is_checked():
    x = torch.randn(1, 10, 8)
    with pytest.raises(ValueError, match="relevance_features"):
        vtok.compress(x, "cdpruner", 4, relevance_features=torch.randn(1, 9, 5))
    with pytest.raises(ValueError, match=r"D=5 \(the width of 'relevance_features'\)"):
        vtok.compress(x, "cdpruner", 4, relevance_features=torch.randn(1, 10, 5), query=torch.randn(1, 8))
    with pytest.raises(ValueError, match="D=8"):
        vtok.compress(x, "cdpruner", 4, query=torch.randn(1, 5))


# ----------------------------------------------------------------------------------------------------------- DART
def _dart_authors(last_layer_state: torch.Tensor, keys: torch.Tensor, start: int, length: int, keep: int,
                  pivot_image: int = 4, pivot_text: int = 4) -> list[int]:
    """Their ``get_retained_image_token`` for one sample: ``last_layer_state [L, D]`` (the final-normed hidden states
    entering layer K), ``keys [L, Dk]`` (layer K−1's, heads concatenated), the image at ``start : start + length``,
    every token after it an instruction token; ``keep`` their budget (``TOKEN_TOPK = keep // 8``). Returns the kept
    sequence indices, sorted."""
    topk = keep // (pivot_image + pivot_text)
    img_norm = keys[start:start + length].abs().sum(-1)
    txt_norm = keys[start + length:].abs().sum(-1)
    image_indices = (img_norm.topk(pivot_image).indices + start).tolist()
    query_indices = (txt_norm.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid_indices)
    for item in list(indices_set):
        cos = -F.cosine_similarity(last_layer_state[item], last_layer_state[valid_list], dim=-1)
        chosen = [valid_list[i] for i in cos.topk(topk).indices.tolist()]
        indices_set.update(chosen)
        valid_indices.difference_update(chosen)
        valid_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def _dart_draw(seed: int, dk: int = 32, d: int = 64):
    """A prompt of ``P`` text tokens, ``N`` image tokens, ``T`` instruction tokens: keys and final-normed states."""
    g = torch.Generator().manual_seed(seed)
    p, t = 5 + seed * 7 % 60, 8 + seed % 33
    length = p + N + t
    keys = torch.randn(length, dk, generator=g, dtype=torch.float64) * (0.5 + torch.rand(length, 1, generator=g,
                                                                                           dtype=torch.float64))
    states = torch.randn(length, d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(d, generator=g,
                                                                                          dtype=torch.float64)
    return p, t, keys, states


def _dart_vtok(p, t, keys, states, k, **options):
    img, txt = slice(p, p + N), slice(p + N, p + N + t)
    _, sel = vtok.compress(states[None, img], "dart", k, keys=keys[None, img], features=states[None, img],
                           text_features=states[None, txt], text_keys=keys[None, txt],
                           seq_index=torch.arange(p, p + N)[None], text_seq_index=torch.arange(p + N, p + N + t)[None],
                           **options)
    return (sel.keep[0] + p).tolist()


def test_dart_equals_the_authors_set_order():
    """Their pivots in their set order: 100 of 100 draws at N = 576 (keep 64 / 128 / 192 → 68 / 132 / 196 tokens
    with the image pivots, vtok's ``k``). vtok's earlier order (image pivots first) agrees only by chance."""
    by_rank = 0
    for seed in SEEDS:
        p, t, keys, states = _dart_draw(seed)
        keep = (64, 128, 192)[seed % 3]
        want = _dart_authors(states, keys, p, N, keep)
        k = 4 + 8 * (keep // 8)
        assert len(want) == k
        assert _dart_vtok(p, t, keys, states, k) == want, seed
        by_rank += _dart_vtok(p, t, keys, states, k, pivot_order="rank") == want
    assert by_rank <= 25


def test_cpython_set_order_is_the_interpreters():
    """The transcription of CPython's set (8 slots, 60 % fill, 9 linear probes, perturbed jumps) is the running
    interpreter's ``set`` order, for DART's 8 pivots and for other sizes (duplicates included)."""
    rng = random.Random(0)
    for _ in range(20000):
        n = rng.choice([8, 8, 8, rng.randint(1, 40)])
        hi = rng.choice([40, 700, 3000, 100000])
        keys = [rng.randrange(hi) for _ in range(n)]
        assert cpython_set_order(keys) == list(set(keys)), keys
    # by hand: image pivots 100, 36, 68, 600 go into 8 slots (100 at 4; 36 and 68 collide there and jump to
    # (5·4 + 1 + p >> 5) & 7 = 6 and 7; 600 at 0); the first text pivot 611 (slot 3) makes it 32 slots, refilled in
    # slot order: 600 → 24, 611 → 3, 100 → 4, 36 → 5 and 68 → 6 (linear probes after 4); then 620 → 12, 640 → 0,
    # 615 → 7
    keys = [100, 36, 68, 600, 611, 620, 640, 615]
    assert cpython_set_order(keys) == list(set(keys)) == [640, 611, 100, 36, 68, 615, 620, 600]
    with pytest.raises(ValueError, match="2\\*\\*61"):
        cpython_set_order([-1])


# ------------------------------------------------------------------------------------------------ through vtok.wrap
@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _dpp_plain(x: torch.Tensor, r: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of ``L = diag(r) S diag(r)``, ``S`` the cosine of ``x``: the authors' loop, sorted picks."""
    xn = x / x.norm(dim=-1, keepdim=True)
    kernel = r[:, None] * (xn @ xn.T) * r[None, :]
    cis, di2s, picks = torch.zeros(k, len(x), dtype=x.dtype), kernel.diagonal().clone(), []
    for i in range(k):
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i], di2s = eis, di2s - eis * eis
        di2s[j] = float("-inf")
    return sorted(picks)


@pytest.mark.parametrize("k", [3, 8])
def test_cdpruner_through_the_wrapper_is_the_substitute(model, k):
    """LLaVA in transformers has no CLIP text tower, so ``vtok.wrap`` measures relevance in the language model's
    input space: the projected image features (the tokens, which also give the similarity, as the authors') against
    the mean input embedding of the prompt's text tokens, with the paper's positive cosine (``"auto"``); per image,
    a left-padded batch of two prompts (three images)."""
    from tests.hf.test_hf_wrap import _image_features, _pix

    rows = [llava_prompt([1, 5, 9], 1, [11, 12, 13]), llava_prompt([3], 2, [11, 12, 13, 14, 15])]
    ids, am = left_pad(rows)
    pix = _pix(3)
    with torch.no_grad():
        feats = _image_features(model, pix)
        emb = model.model.language_model.get_input_embeddings()(ids)
        want, seen = [], 0
        for b in range(2):
            img = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1)
            text = am[b].bool() & (ids[b] != IMAGE_TOKEN)
            q = emb[b, text].double().mean(0)
            cols = []
            for start in img[::16].tolist():
                x = feats[seen].double()
                s = F.cosine_similarity(x, q[None], dim=-1)
                r = (s - s.min() + 1e-6) / (s.max() - s.min())
                cols += [start + i for i in _dpp_plain(x, r, k)]
                seen += 1
            want.append(cols)
        with vtok.wrapped(model, "cdpruner", k):
            model(input_ids=ids, attention_mask=am, pixel_values=pix)
            st = vtok.stats(model)
    for b in range(2):
        img = set((ids[b] == IMAGE_TOKEN).nonzero().squeeze(1).tolist())
        assert sorted(set(st["per_sample"][b]["kept"]) & img) == want[b]
