"""Fidelity inside a ViT: vtok's defaults against explicit references of the authors' algorithms, written here from
the papers' and codes' descriptions (float64 random-weight timm ViTs).

* ToMe (arXiv 2210.09461, Sec. 3 and its timm patch): bipartite soft matching on head-averaged keys, class token
  never a source, ``merge_wavg`` size-weighted averages, the merged sequence ``[unmerged A (sorted) | B]``,
  proportional attention ``+ log(size)``; the whole patched ViT must give the same logits.
* VisionZip (arXiv 2412.04467, Sec. 3.2 and its CLIP tower code): layer −2's attention, keys and output; CLS counted
  as a dominant token; ``[CLS, dominant ascending, contextual]`` with ``contextual = target + mean(others)``.
* HiPrune (arXiv 2508.00553, Sec. 3): attention averaged over heads and all query rows, anchors from a middle block.
"""

import math

import pytest
import torch

import vtok
from tests.hooks.test_hooks_encoders import GRID, eager_attention, prune_reduce, ref_timm

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def vit64(depth=12, img=224, dim=384, heads=6, seed=0):
    torch.manual_seed(seed)
    m = timm_vit.VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                   num_classes=10)
    return m.double().eval()


def imgs(b=2, img=224, seed=1):
    return torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------- ToMe


def _merge_sum(v, unm, src, dst):
    """``v [B, T, C]`` → ``[unmerged A | B]`` with each merged A row added onto its B partner (per-row loops)."""
    a_side, b_side = v[:, 0::2], v[:, 1::2].clone()
    for bi in range(v.shape[0]):
        for j in range(src.shape[1]):
            b_side[bi, dst[bi, j]] += a_side[bi, src[bi, j]]
    keep_a = a_side.gather(1, unm[..., None].expand(-1, -1, v.shape[-1]))
    return torch.cat([keep_a, b_side], 1)


def tome_reference_logits(m, img, r):
    """The authors' ToMe on a timm ViT with a class token, written out: per block, eager attention with ``log(size)``
    added once sizes exist, metric = keys averaged over heads; A = even, B = odd positions of the *current* sequence;
    class token never a source; the ``r`` best edges (descending score) merge into B by size-weighted sums; the new
    sequence is the unmerged A tokens sorted ascending, then all B tokens."""
    x = m.norm_pre(m._pos_embed(m.patch_embed(img)))
    size = None
    for blk in m.blocks:
        a = blk.attn
        bias = None if size is None else size.log()[:, None, None, :]
        o, _, keys = eager_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                     a.num_heads, bias)
        x = x + o
        t = x.shape[1]
        rr = min(r, (t - 1) // 2)
        if rr > 0:
            metric = keys.mean(1)
            metric = metric / metric.norm(dim=-1, keepdim=True)
            scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
            scores[:, 0, :] = -math.inf
            best, partner = scores.max(dim=-1)
            edges = best.argsort(dim=-1, descending=True)
            unm, src = edges[:, rr:].sort(dim=1).values, edges[:, :rr]
            dst = partner.gather(1, src)
            s = torch.ones(x.shape[:2] + (1,), dtype=x.dtype) if size is None else size[..., None]

            wsum, new_size = _merge_sum(x * s, unm, src, dst), _merge_sum(s, unm, src, dst)
            x, size = wsum / new_size, new_size[..., 0]
        x = x + blk.mlp(blk.norm2(x))
    return m.forward_head(m.norm(x))


@pytest.mark.parametrize("r", [1, 8, 16])
def test_tome_in_encoder_equals_authors_algorithm(r):
    m = vit64()
    x = imgs()
    with torch.no_grad():
        ref = tome_reference_logits(m, x, r)
        vtok.patch(m, "tome", r=r)
        out = m(x)
        vtok.unpatch(m)
        plain = m(x)
    assert (out - ref).abs().max().item() <= 1e-6
    assert (plain - ref).abs().max().item() > 1e-3  # the merging really changed the logits


def test_tome_position_order_differs_from_the_authors_order():
    m = vit64(depth=4)
    x = imgs()
    with torch.no_grad():
        ref = tome_reference_logits(m, x, 8)
        out = vtok.patch(m, "tome", r=8, order="position")(x)
    assert (out - ref).abs().max().item() > 1e-4


# ------------------------------------------------------------------------------------------------------ VisionZip


def visionzip_reference(hidden, attn, keys, dominant, contextual):
    """The authors' VisionZip on one layer: ``hidden [B, 1+N, D]`` (CLS first), ``attn [B, H, 1+N, 1+N]``, ``keys
    [B, H, 1+N, dh]``; ``dominant`` counts CLS. Returns ``[B, dominant + contextual, D]``."""
    b, t, _ = hidden.shape
    cls_row = attn[:, :, 0, 1:].sum(1)
    top = cls_row.topk(dominant - 1, dim=1).indices + 1
    chosen = torch.zeros(b, t, dtype=torch.bool)
    chosen[:, 0] = True
    chosen.scatter_(1, top, True)
    metric = keys.mean(1)
    out = []
    for i in range(b):
        dom = hidden[i, chosen[i]]  # CLS, then dominant patches in ascending position
        rest_h, rest_m = hidden[i, ~chosen[i]], metric[i, ~chosen[i]]
        rest_m = rest_m / rest_m.norm(dim=-1, keepdim=True)
        step = max(1, rest_h.shape[0] // contextual)
        targets = list(range(0, rest_h.shape[0], step))[:contextual]
        others = [j for j in range(rest_h.shape[0]) if j not in targets]
        joined = (rest_m[others] @ rest_m[targets].T).argmax(1)
        ctx = []
        for c, tj in enumerate(targets):
            members = [others[o] for o in range(len(others)) if joined[o] == c]
            mean = rest_h[members].mean(0) if members else torch.zeros_like(rest_h[tj])
            ctx.append(rest_h[tj] + mean)
        out.append(torch.cat([dom, torch.stack(ctx)]))
    return torch.stack(out)


def layer_tensors(m, img, layer):
    """Hidden states (CLS included) after block ``layer``, with its attention probabilities and keys, by hand."""
    x = m.norm_pre(m._pos_embed(m.patch_embed(img)))
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        o, probs, keys = eager_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                         a.num_heads)
        x = x + o
        x = x + blk.mlp(blk.norm2(x))
        if i == layer:
            return x, probs, keys
    raise AssertionError(layer)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (20, 6), (100, 28)])
def test_visionzip_compress_equals_reference_values_and_order(dominant, contextual):
    m = vit64(depth=4)
    x = imgs()
    with torch.no_grad():
        hidden, probs, keys = layer_tensors(m, x, 2)
        ref = visionzip_reference(hidden, probs, keys, dominant, contextual)
        # vtok: patch tokens only; the reference's counts are keep = dominant + contextual - 1 (CLS is re-attached)
        out, sel = vtok.compress(hidden[:, 1:], "visionzip", keep=dominant + contextual - 1, dominant=dominant - 1,
                                 cls_attn=probs[:, :, 0, 1:], keys=keys[:, :, 1:])
        with vtok.capture(m, layers=2, what=("cls_attn", "keys", "hidden")) as feats:
            m(x)
        out_cap, _ = vtok.compress(feats[2]["hidden"], "visionzip", keep=dominant + contextual - 1,
                                   dominant=dominant - 1, cls_attn=feats[2]["cls_attn"], keys=feats[2]["keys"])
    got = torch.cat([hidden[:, :1], out], 1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-6
    assert (torch.cat([hidden[:, :1], out_cap], 1) - ref).abs().max().item() <= 1e-6
    assert sel.order is not None  # emitted [dominant | contextual], not position order


def test_visionzip_patch_default_equals_reference_at_layer_minus_two():
    """``vtok.patch(vit, "visionzip")`` prunes block −2's output with block −2's attention, as the authors' code
    does; the last block then runs on ``[CLS, dominant, contextual]``."""
    m = vit64(depth=4)
    x = imgs()
    dominant, contextual = 30, 8
    with torch.no_grad():
        hidden, probs, keys = layer_tensors(m, x, 2)
        h = visionzip_reference(hidden, probs, keys, dominant, contextual)
        last = m.blocks[3]
        h = h + last.attn(last.norm1(h))
        h = h + last.mlp(last.norm2(h))
        ref = m.forward_head(m.norm(h))
        vtok.patch(m, "visionzip", keep=dominant + contextual - 1, dominant=dominant - 1)
        out = m(x)
        sel = m._vtok_state.selection
    assert (out - ref).abs().max().item() <= 1e-6
    assert sel.k == dominant + contextual - 1


# -------------------------------------------------------------------------------------------------------- HiPrune


def test_hiprune_context_is_head_and_query_averaged_with_middle_layer_anchors():
    m = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=8, num_heads=4, num_classes=10)
    m = m.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mid = math.floor(9 / 24 * 8)  # 3: the paper's layer 9 of 24, scaled
    record = []
    with torch.no_grad():
        ref, _ = ref_timm(m, x, prune_reduce("hiprune", 0.4, 6, record, mid_layer=mid, alpha=0.5))
        vtok.patch(m, "hiprune", keep=0.4, layers=6, alpha=0.5)
        assert m._vtok_state.plan.mid_layer == mid
        out = m(x)
        sel = m._vtok_state.selection
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(sel.keep, record[0].keep)
    # the explicit context: mean over heads and all query rows, patch keys only
    with torch.no_grad():
        probs = {}
        xs = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for i, blk in enumerate(m.blocks[:7]):
            a = blk.attn
            o, p_, _ = eager_attention(blk.norm1(xs), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias, 4)
            probs[i] = p_[:, :, :, 1:].mean((1, 2))
            xs = xs + o
            xs = xs + blk.mlp(blk.norm2(xs))
        patch = xs[:, 1:]
        _, want = vtok.compress(patch, "hiprune", keep=0.4, mid_attn=probs[mid], cls_attn=probs[6], grid=GRID,
                                alpha=0.5)
    assert torch.equal(sel.keep, want.keep)


def test_mid_layer_override_and_errors():
    m = timm_vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=8, num_heads=4).eval()
    vtok.patch(m, "hiprune", keep=0.5, layers=5, mid_layer=2)
    assert m._vtok_state.plan.mid_layer == 2
    vtok.unpatch(m)
    with pytest.raises(ValueError, match="mid_layer"):
        vtok.patch(m, "hiprune", keep=0.5, layers=2, mid_layer=5)
    with pytest.raises(ValueError, match="mid_layer"):
        vtok.patch(m, "cls_attn", keep=0.5, mid_layer=2)
    with pytest.raises(ValueError, match="at must be"):
        vtok.patch(m, "cls_attn", keep=0.5, at="mlp")
    vtok.patch(m, "visionzip", keep=0.5, layers=3, at="attention")  # the earlier in-block placement, as an option
    assert m._vtok_state.plan.at == "attention" and m._vtok_state.plan.prune_keep == {3: 0.5}
