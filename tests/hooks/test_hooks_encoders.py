"""vtok.patch / unpatch / capture on tiny random-weight timm and open_clip ViTs, checked against hand-written
reference forwards (eager attention written out from the weights, proportional attention's log-size bias by hand,
a naive per-sample ToMe step)."""

import pytest
import torch
import torch.nn.functional as F

import vtok
from vtok.hooks.encoders import capture

timm_vit = pytest.importorskip("timm.models.vision_transformer")
open_clip = pytest.importorskip("open_clip")

GRID = (8, 8)  # 32 px images, 4 px patches
NP = GRID[0] * GRID[1]


def make_timm(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    return timm_vit.VisionTransformer(**args).eval()


def make_clip():
    torch.manual_seed(0)
    from open_clip.model import CLIP

    return CLIP(embed_dim=16, vision_cfg=dict(layers=4, width=64, head_width=16, patch_size=4, image_size=32),
                text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()


def images(b=3, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ reference forwards


def eager_attention(x, w_qkv, b_qkv, w_out, b_out, heads, bias=None):
    """Self-attention written out: returns (out, probs [B, H, N, N], keys [B, H, N, dh])."""
    b, n, d = x.shape
    dh = d // heads
    q, k, v = (x @ w_qkv.T + b_qkv).view(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * dh ** -0.5
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, d)
    return out @ w_out.T + b_out, probs, k


def ref_timm(m, img, reduce, after_mlp=False, prop_attn=True):
    """timm ViT by hand; ``reduce(i, x, probs, keys, sizes) -> (x, sizes)`` runs between attention and MLP (or on
    the block's output with ``after_mlp``, with that block's attention)."""
    x = m.norm_pre(m._pos_embed(m.patch_embed(img)))
    sizes = None
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        bias = None if sizes is None or not prop_attn else sizes.log()[:, None, None, :]
        o, probs, k = eager_attention(blk.norm1(x), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                      a.num_heads, bias)
        x_in, x = x, x + blk.ls1(o)
        if not after_mlp:
            x, sizes = reduce(i, x, probs, k, sizes, x_in)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        if after_mlp:
            x, sizes = reduce(i, x, probs, k, sizes, x_in)
    return m.forward_head(m.norm(x)), sizes


def ref_openclip(v, img, reduce):
    x = v._embeds(img)
    sizes = None
    for i, blk in enumerate(v.transformer.resblocks):
        a = blk.attn
        bias = None if sizes is None else sizes.log()[:, None, None, :]
        o, probs, k = eager_attention(blk.ln_1(x), a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
                                      a.out_proj.bias, a.num_heads, bias)
        x_in, x = x, x + blk.ls_1(o)
        x, sizes = reduce(i, x, probs, k, sizes, x_in)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    pooled, _ = v._pool(x)
    return pooled @ v.proj, sizes


def prune_reduce(method, keep, layer, record, p=1, mid_layer=None, **options):
    """Reference pruning: the strategy via vtok.compress on context written out from the eager attention. Scores are
    the CLS row (head mean), or for methods reading all query rows (HiPrune) the attention received averaged over
    heads and every query row; ``mid_attn`` is that score at ``mid_layer`` (default: the pruning block)."""
    info = vtok.get_method(method)
    mids = {}

    def reduce(i, x, probs, k, sizes, x_in=None):
        score = probs[:, :, :, p:].mean((1, 2)) if info.placement.score_rows == "all" else probs[:, :, 0, p:].mean(1)
        if i == mid_layer:
            mids["mid"] = score
        if i != layer:
            return x, sizes
        want = info.needs | info.uses
        ctx = {}
        if "cls_attn" in want:
            ctx["cls_attn"] = score
        if "mid_attn" in want:
            ctx["mid_attn"] = mids.get("mid", score)
        if "keys" in want:
            ctx["keys"] = k[:, :, p:]
        if "grid" in want:
            ctx["grid"] = GRID
        if "attn" in want:
            ctx["attn"] = F.normalize(probs[:, :, p:, p:], p=1, dim=-1)  # patch-to-patch rows, renormalised
        if "prev_hidden" in want:
            ctx["prev_hidden"] = x_in[:, p:]  # the block's input: TTV of its attention update
        out, sel = vtok.compress(x[:, p:], method, keep, **ctx, **options)
        record.append(sel)
        if sel.merges:
            sizes = torch.cat([torch.ones(x.shape[0], p), sel.token_sizes()], 1)
        return torch.cat([x[:, :p], out], 1), sizes

    return reduce


def naive_tome_step(x, keys, sizes, r, p, order="tome"):
    """One ToMe step per sample with Python loops: A = even positions, B = odd; CLS (< p) protected; edges by cosine
    of head-averaged keys; the r best edges merge A into B by size-weighted average. The result is emitted as in
    ToMe's code, ``[protected, unmerged A (ascending when p > 0, else by descending score), B]``, or in position
    order (``order="position"``)."""
    outs, out_sizes = [], []
    for b in range(x.shape[0]):
        f = F.normalize(keys[b].mean(0), dim=-1)
        n = x.shape[1]
        s = torch.ones(n, dtype=x.dtype) if sizes is None else sizes[b]
        dst_pos = [j for j in range(1, n, 2) if j >= p]
        edges = []
        for a in range(0, n, 2):
            if a < p:
                continue
            sims = torch.stack([f[a] @ f[j] for j in dst_pos])
            edges.append((float(sims.max()), a, dst_pos[int(sims.argmax())]))
        edges = sorted(edges, key=lambda e: -e[0])  # stable: ties keep A order
        src = {a: d for _, a, d in edges[:r]}
        if order == "position":
            seq = [t for t in range(n) if t not in src]
        else:
            unm = [a for _, a, _ in edges[r:]]
            seq = list(range(p)) + (sorted(unm) if p else unm) + dst_pos
        rows, szs = [], []
        for t in seq:
            members = [t] + [a for a, d in src.items() if d == t]
            w = torch.stack([s[m] for m in members])
            rows.append((x[b, members] * w[:, None]).sum(0) / w.sum())
            szs.append(w.sum())
        outs.append(torch.stack(rows))
        out_sizes.append(torch.stack(szs))
    return torch.stack(outs), torch.stack(out_sizes)


def tome_reduce(r, p=1, order="tome"):
    def reduce(i, x, probs, k, sizes, x_in=None):
        step = min(r, (x.shape[1] - p) // 2)
        return naive_tome_step(x, k, sizes, step, p, order) if step > 0 else (x, sizes)

    return reduce


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_keep_one_and_r_zero_are_bit_exact(kind):
    model = make_timm() if kind == "timm" else make_clip().visual
    x = images()
    with torch.no_grad():
        ref = model(x)
        for method, kw in [("tome", dict(r=0)), ("cls_attn", dict(keep=1.0)),
                           ("divprune", dict(keep=NP, layers=[0, 2])), ("tome", dict(r=[0, 0], layers=[1, 3]))]:
            vtok.patch(model, method, **kw)
            assert torch.equal(model(x), ref), (method, kw)
            sel = model._vtok_state.selection
            assert torch.equal(sel.keep, torch.arange(NP).expand(3, NP)) and sel.assign is None
            vtok.unpatch(model)


def test_clip_model_is_accepted_and_patches_its_visual():
    clip = make_clip()
    x = images()
    with torch.no_grad():
        ref = clip.encode_image(x)
        vtok.patch(clip, "tome", r=0)
        assert clip._vtok_state is clip.visual._vtok_state
        assert torch.equal(clip.encode_image(x), ref)
        with pytest.raises(ValueError, match="already patched"):
            vtok.patch(clip.visual, "tome", r=4)
        vtok.unpatch(clip)
        assert not hasattr(clip.visual, "_vtok_state") and not hasattr(clip, "_vtok_state")


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_unpatch_restores_exact_outputs_and_classes(kind):
    model = make_timm() if kind == "timm" else make_clip()
    blocks = list(model.blocks) if kind == "timm" else list(model.visual.transformer.resblocks)
    classes = [type(b) for b in blocks]
    fwd = model if kind == "timm" else model.encode_image
    x = images()
    with torch.no_grad():
        ref = fwd(x)
        vtok.patch(model, "tome", r=8)
        assert not torch.equal(fwd(x), ref)
        vtok.unpatch(model)
        assert torch.equal(fwd(x), ref)
    assert [type(b) for b in blocks] == classes
    assert not any(hasattr(b, "_vtok_state") for b in blocks)
    embed = model.patch_embed if kind == "timm" else model.visual.conv1
    assert not embed._forward_hooks


# ------------------------------------------------------------------------------------------------ errors


def test_patching_twice_raises_and_unpatch_of_plain_model_raises():
    m = make_timm()
    vtok.patch(m, "tome", r=2)
    with pytest.raises(ValueError, match="already patched"):
        vtok.patch(m, "cls_attn", keep=0.5)
    vtok.unpatch(m)
    with pytest.raises(ValueError, match="not patched"):
        vtok.unpatch(m)


def test_unsupported_models_raise_type_error_listing_architectures():
    with pytest.raises(TypeError, match="supported encoders: timm VisionTransformer.*open_clip VisionTransformer"):
        vtok.patch(torch.nn.Linear(4, 4), "tome", r=2)
    with pytest.raises(TypeError, match="ResPostBlock"):
        vtok.patch(make_timm(block_fn=timm_vit.ResPostBlock), "tome", r=2)
    with pytest.raises(TypeError):
        vtok.patch("not a model", "tome", r=2)


@pytest.mark.parametrize("method, kw, match", [
    ("nope", dict(keep=0.5), "unknown method"),
    ("cls_attn", dict(keep=0.0), "keep"),
    ("cls_attn", dict(keep=1.5), "keep"),
    ("cls_attn", dict(keep=NP + 1), "keep"),
    ("cls_attn", dict(), "needs keep"),
    ("fastv", dict(keep=0.5), "text_attn"),
    ("divprune", dict(keep=0.5, r=4), "r="),
    ("tome", dict(), "needs keep"),
    ("tome", dict(r=4, keep=0.5), "either"),
    ("tome", dict(r=-1), "r must"),
    ("cls_attn", dict(keep=0.5, layers=4), "layers"),
    ("cls_attn", dict(keep=0.5, layers=[1, 1]), "repeat"),
    ("cls_attn", dict(keep=[0.5, 0.5], layers=[1]), "entries"),
    ("hiprune", dict(keep=0.5, layers=[1, 2]), "full patch grid"),
])
def test_bad_arguments_raise_value_error(method, kw, match):
    m = make_timm()
    with pytest.raises(ValueError, match=match):
        vtok.patch(m, method, **kw)
    assert not hasattr(m, "_vtok_state")


def test_grid_method_on_tokens_that_are_not_the_full_grid_raises():
    m = make_timm(patch_drop_rate=0.25).train()  # patch dropout: fewer tokens than the grid before block 0
    vtok.patch(m, "pool2d", keep=0.25, layers=0)
    with pytest.raises(ValueError, match="no longer a full grid.*patch dropout"):
        m(images())


def test_unknown_option_raises_type_error():
    with pytest.raises(TypeError, match="unknown option"):
        vtok.patch(make_timm(), "random", keep=0.5, sed=1)


# ------------------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("method, layer, options", [
    ("cls_attn", 1, {}), ("divprune", 2, {}), ("hiprune", 1, {"alpha": 0.3}), ("visionzip", 1, {}),
    ("zero_tprune", 2, {}), ("fopru", 1, {"mode": "row"}), ("pool2d", 0, {}), ("tome", 1, {}),
    ("transprune", 2, {}),
])
def test_timm_pruning_equals_reference(method, layer, options):
    m = make_timm()
    x = images()
    record = []
    with torch.no_grad():
        place = vtok.get_method(method).placement
        ref, ref_sizes = ref_timm(m, x, prune_reduce(method, 0.5, layer, record, **options), place.at == "output",
                                  place.prop_attn)
        vtok.patch(m, method, keep=0.5, layers=layer, **options)
        out = m(x)
        st = m._vtok_state
    close(out, ref)
    assert torch.equal(st.selection.keep, record[0].keep)
    if record[0].merges:  # later blocks ran with proportional attention
        assert torch.equal(st.selection.assign, record[0].assign)
        close(st.sizes, ref_sizes)


def test_layer_alias():
    m = vtok.patch(make_timm(), "uniform", keep=16, layer=2)
    assert m._vtok_state.plan.prune_keep == {2: 16}


def test_timm_two_pruning_layers_compose_selection():
    m = make_timm()
    x = images()
    record = []
    r1, r2 = prune_reduce("cls_attn", 0.5, 1, record), prune_reduce("cls_attn", 8, 3, record)

    def reduce(i, x_, probs, k, sizes, x_in=None):
        x_, sizes = r1(i, x_, probs, k, sizes, x_in)
        return r2(i, x_, probs, k, sizes)

    with torch.no_grad():
        ref, _ = ref_timm(m, x, reduce)
        vtok.patch(m, "cls_attn", keep=[0.5, 8], layers=[1, 3])
        out = m(x)
    close(out, ref)
    sel = m._vtok_state.selection
    assert sel.k == 8 and torch.equal(sel.keep, record[0].keep.gather(1, record[1].keep))


@pytest.mark.parametrize("r", [5, 40])
def test_timm_tome_equals_reference_with_proportional_attention(r):
    m = make_timm()
    x = images()
    with torch.no_grad():
        ref, ref_sizes = ref_timm(m, x, tome_reduce(r))
        vtok.patch(m, "tome", r=r)
        out = m(x)
        st = m._vtok_state
    close(out, ref)
    close(st.sizes, ref_sizes)
    sel = st.selection
    assert sel.n == NP and sel.k == ref_sizes.shape[1] - 1
    # every original patch token is accounted for exactly once; sizes agree with the composed merge map
    close(sel.token_sizes(), st.sizes[:, 1:])
    assert bool((sel.assign >= 0).all())


def test_timm_tome_without_proportional_attention_and_layer_subset():
    """Also the spatial-order option: ``order="position"`` keeps every merged sequence in position order."""
    m = make_timm()
    x = images()

    def reduce(i, x_, probs, k, sizes, x_in=None):
        return tome_reduce(6, order="position")(i, x_, probs, k, sizes) if i in (0, 2) else (x_, sizes)

    with torch.no_grad():
        # reference without the bias: drop sizes before each attention, keep them for the weighted averages
        xs = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        sizes = None
        for i, blk in enumerate(m.blocks):
            a = blk.attn
            o, probs, k = eager_attention(blk.norm1(xs), a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias, 4)
            xs = xs + o
            xs, sizes = reduce(i, xs, probs, k, sizes)
            xs = xs + blk.mlp(blk.norm2(xs))
        ref = m.forward_head(m.norm(xs))
        vtok.patch(m, "tome", r=6, layers=[0, 2], prop_attn=False, order="position")
        out = m(x)
    close(out, ref)
    assert m._vtok_state.selection.k == NP - 12 and m._vtok_state.selection.order is None


def test_openclip_pruning_and_tome_equal_reference():
    clip = make_clip()
    v = clip.visual
    x = images()
    record = []
    with torch.no_grad():
        ref, _ = ref_openclip(v, x, prune_reduce("cls_attn", 0.25, 2, record))
        vtok.patch(clip, "cls_attn", keep=0.25, layers=2)
        close(clip.encode_image(x), ref)
        assert torch.equal(clip._vtok_state.selection.keep, record[0].keep)
        vtok.unpatch(clip)
        ref, ref_sizes = ref_openclip(v, x, tome_reduce(9))
        vtok.patch(v, "tome", r=9)
        close(v(x), ref)
        close(v._vtok_state.sizes, ref_sizes)


def test_model_without_cls_uses_mean_received_attention():
    m = make_timm(class_token=False, global_pool="avg")
    x = images()
    record = []

    def reduce(i, x_, probs, k, sizes, x_in=None):
        if i != 1:
            return x_, sizes
        out, sel = vtok.compress(x_, "cls_attn", 0.5, cls_attn=probs.mean(2).mean(1))
        record.append(sel)
        return out, sizes

    with torch.no_grad():
        ref, _ = ref_timm(m, x, reduce)
        vtok.patch(m, "cls_attn", keep=0.5, layers=1)
        out = m(x)
    close(out, ref)
    assert torch.equal(m._vtok_state.selection.keep, record[0].keep)


# ------------------------------------------------------------------------------------------------ batch


@pytest.mark.parametrize("kind, method, kw", [
    ("timm", "tome", dict(r=7)), ("timm", "cls_attn", dict(keep=0.3, layers=1)),
    ("open_clip", "divprune", dict(keep=0.5)), ("open_clip", "visionzip", dict(keep=16, layers=0)),
])
def test_batch_equals_each_sample_alone(kind, method, kw):
    model = make_timm() if kind == "timm" else make_clip().visual
    vtok.patch(model, method, **kw)
    x = images(b=4, seed=3)
    with torch.no_grad():
        out = model(x)
        sel = model._vtok_state.selection
        for b in range(4):
            close(model(x[b:b + 1]), out[b:b + 1])
            one = model._vtok_state.selection
            assert torch.equal(one.keep[0], sel.keep[b])
            if sel.assign is not None:
                assert torch.equal(one.assign[0], sel.assign[b])


# ------------------------------------------------------------------------------------------------ capture


def test_capture_matches_eager_attention_and_restores_the_model():
    m = make_timm()
    x = images()
    with torch.no_grad():
        ref = m(x)
        want = {}

        def reduce(i, x_, probs, k, sizes, x_in=None):
            want[i] = dict(cls_attn=probs[:, :, 0, 1:].mean(1), keys=k[:, :, 1:],
                           attn=F.normalize(probs[:, :, 1:, 1:], p=1, dim=-1))
            return x_, sizes

        ref_timm(m, x, reduce)
        hidden = m.blocks[:3](m.norm_pre(m._pos_embed(m.patch_embed(x))))
        with capture(m, layers=[0, 2], what=("cls_attn", "keys", "hidden", "attn")) as feats:
            out = m(x)
        close(out, ref)
        assert sorted(feats) == [0, 2] and feats.num_prefix == 1 and feats.grid == GRID
        for i in (0, 2):
            for key in ("cls_attn", "keys", "attn"):
                close(feats[i][key], want[i][key])
        close(feats[2]["hidden"], hidden[:, 1:])
        assert not hasattr(m, "_vtok_state") and torch.equal(m(x), ref)


def test_capture_on_patched_model_sees_reduced_tokens():
    m = make_timm()
    vtok.patch(m, "cls_attn", keep=16, layers=1)
    with torch.no_grad(), vtok.capture(m, layers=-1, what="cls_attn") as feats:
        m(images())
    assert feats[3]["cls_attn"].shape == (3, 16) and feats.selection.k == 16
    assert m._vtok_state.capture == {}
    with pytest.raises(ValueError, match="what must"):
        with vtok.capture(m, what="logits"):
            pass
    vtok.unpatch(m)
