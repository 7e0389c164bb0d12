"""Attention-score strategies: CLS attention, FoPru, HiPrune, VisionZip, Zero-TPrune, FastV.

All of them rank tokens by attention the hook has already reduced to per-token scores (``cls_attn``,
``mid_attn``, ``text_attn``); only Zero-TPrune reads the full ``N × N`` graph (``attn``), because its
PageRank needs it. Per-head inputs are averaged over heads. Ties go to the lowest token index
(``ops.stable_topk``), and every strategy returns the identity at ``k == N``.

Shapes: ``B`` batch, ``N`` tokens, ``D`` features, ``H`` heads, ``T`` query rows, ``(h, w)`` patch grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_choice, check_fraction, check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection, gather_tokens

# ---------------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------------

def _scores(x: Tensor) -> Tensor:
    """``[B, N]`` or per head ``[B, H, N]`` → ``[B, N]`` fp32 (fp64 for fp64 input; mean over heads)."""
    x = acc(x)
    return x.mean(1) if x.dim() == 3 else x


def _features(tokens: Tensor, ctx: Context) -> Tensor:
    """Matching features ``[B, N, F]``: ``keys`` if given (per head ``[B, H, N, dh]`` averaged over heads, as
    ToMe and VisionZip do), else the tokens themselves."""
    keys = ctx.get("keys")
    if keys is None:
        return tokens
    return acc(keys).mean(1) if keys.dim() == 4 else keys


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _rank_order(scores: Tensor) -> Tensor:
    """``[B, N]`` indices by descending score, ties → lowest index."""
    return torch.sort(acc(scores), dim=1, descending=True, stable=True).indices


def _remaining(mask: Tensor, count: int) -> Tensor:
    """Indices ``[B, count]`` of the ``False`` positions of ``mask [B, N]`` in original order (each row must
    have exactly ``count`` of them)."""
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :count]


# ---------------------------------------------------------------------------------------------------------------
# CLS attention
# ---------------------------------------------------------------------------------------------------------------

@register("cls_attn", family="attention", needs=("cls_attn",),
          paper="CLS-attention top-k (as in EViT, arXiv 2202.07800, and the dominant tokens of VisionZip)")
def cls_attn_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep the ``k`` tokens that receive the most attention from the CLS query.

    ``cls_attn``: ``[B, N]`` or per head ``[B, H, N]`` (averaged over heads). Returns ``keep [B, k]`` in
    original order; ties → lowest index.
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(_scores(ctx["cls_attn"]), k), n)


# ---------------------------------------------------------------------------------------------------------------
# FoPru
# ---------------------------------------------------------------------------------------------------------------

@register("fopru", family="attention", needs=("cls_attn",), uses=("grid",),
          paper="FoPru: Focal Pruning for Efficient Large Vision-Language Models (arXiv 2411.14164)")
def fopru_select(tokens: Tensor, k: int, ctx: Context, *, mode: str = "rank") -> Selection:
    """FoPru (Sec. 3): prune by the vision encoder's attention-based token significance, ``mode`` "rank" or "row".

    Significance is ``cls_attn`` (``[B, N]`` or ``[B, H, N]``, head-averaged; the hook may pass the CLS row
    or, for encoders without CLS, the mean attention each token receives — the paper's token significance).

    * ``mode="rank"`` (rank strategy): global top-``k`` by significance.
    * ``mode="row"`` (row strategy, needs ``grid=(h, w)``): rows of the row-major patch grid are scored by
      their total significance and kept whole, best first, preserving local continuity. Because the budget
      is exact and rows hold ``w`` tokens, the first ``k // w`` rows in row-score order are kept whole and the
      remaining ``k % w`` tokens are the most significant tokens of the next-best row (simplification: the
      paper keeps whole rows only).

    As in the paper, kept tokens are returned in original order. Ties → lowest row / token index.
    """
    b, n = tokens.shape[:2]
    check_choice("mode", mode, ("rank", "row"))
    if mode == "row" and "grid" not in ctx:
        raise ValueError("fopru mode='row' needs context 'grid' = (h, w), the patch grid of the tokens")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    sig = _scores(ctx["cls_attn"])
    if mode == "rank":
        return Selection(ops.stable_topk(sig, k), n)
    h, w = ctx["grid"]
    rows = sig.view(b, h, w)
    row_order = _rank_order(rows.sum(-1))  # [B, h]
    full, rem = divmod(k, w)
    keep_row = torch.zeros(b, h, dtype=torch.bool, device=sig.device)
    keep_row.scatter_(1, row_order[:, :full], True)
    mask = keep_row[:, :, None].expand(b, h, w).reshape(b, n).clone()
    if rem:
        nxt = row_order[:, full]  # [B] the next-best row
        in_row = ops.stable_topk(rows[torch.arange(b, device=sig.device), nxt], rem)  # [B, rem] column indices
        mask.scatter_(1, nxt[:, None] * w + in_row, True)
    return Selection.from_mask(mask)


# ---------------------------------------------------------------------------------------------------------------
# HiPrune
# ---------------------------------------------------------------------------------------------------------------

def _grid_neighbours(mask: Tensor, h: int, w: int) -> Tensor:
    """4-neighbourhood (up, down, left, right; no wrap-around at the grid borders) of ``mask [B, h*w]``."""
    m = mask.view(-1, h, w)
    out = torch.zeros_like(m)
    out[:, 1:, :] |= m[:, :-1, :]
    out[:, :-1, :] |= m[:, 1:, :]
    out[:, :, 1:] |= m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, 1:]
    return out.view(mask.shape)


@register("hiprune", family="attention", needs=("mid_attn", "cls_attn", "grid"),
          placement=Placement(score_rows="all", mid_layer=9 / 24),
          paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models "
                "(arXiv 2508.00553)")
def hiprune_select(tokens: Tensor, k: int, ctx: Context, *, alpha: float = 0.1) -> Selection:
    """HiPrune (Sec. 3): anchor, buffer and register tokens from the encoder's attention hierarchy.

    * anchors: the ``a = round_half_up(alpha * k / 5)`` tokens with the highest ``mid_attn`` (a middle,
      object-centric layer; LLaVA/CLIP: layer 9). ``alpha`` is the share of the budget for anchors *plus*
      buffers (official default 0.1); each anchor brings at most 4 buffers, hence ``/ 5`` as in the
      official code.
    * buffers: the 4-neighbours (up/down/left/right) of anchors on the ``grid=(h, w)``, that are not anchors
      themselves. Border anchors have fewer neighbours and overlapping neighbourhoods count once (the
      official code wraps left/right across rows; here neighbours never wrap).
    * registers: the remaining ``k − |anchors ∪ buffers|`` slots go to the highest ``cls_attn`` (the output
      layer, global information) among all other tokens.

    Exact budget: the tokens are ranked anchors first (by ``mid_attn``), then buffers (by ``mid_attn``), then
    the rest (by ``cls_attn``), and the first ``k`` are kept — so if anchors and buffers alone exceed ``k``
    (tiny budgets, large ``alpha``) the lowest-``mid_attn`` buffers are the ones left out.
    ``mid_attn`` / ``cls_attn``: ``[B, N]`` or ``[B, H, N]`` (head-averaged). Ties → lowest index.
    """
    b, n = tokens.shape[:2]
    alpha = check_fraction("alpha", alpha)
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    h, w = ctx["grid"]
    mid = _scores(ctx["mid_attn"])
    deep = _scores(ctx["cls_attn"])
    a = min(_round_half_up(alpha * k / 5.0), k)
    anchor = torch.zeros(b, n, dtype=torch.bool, device=mid.device)
    if a:
        anchor.scatter_(1, ops.stable_topk(mid, a), True)
    buffer = _grid_neighbours(anchor, h, w) & ~anchor
    tier = anchor.to(torch.uint8) * 2 + buffer.to(torch.uint8)  # 2 anchor, 1 buffer, 0 register candidate
    value = torch.where(tier > 0, mid, deep)
    order = _rank_order(value)  # by value, ties → lowest index
    order = order.gather(1, torch.sort(tier.gather(1, order), dim=1, descending=True, stable=True).indices)
    return Selection.from_indices(order[:, :k], n)


# ---------------------------------------------------------------------------------------------------------------
# VisionZip
# ---------------------------------------------------------------------------------------------------------------

_VZ_MERGE = ("reference", "mean")
_VZ_ORDER = ("reference", "position")


@register("visionzip", family="attention", needs=("cls_attn",), uses=("keys",), merges=True,
          placement=Placement(layer=-2, at="output", prop_attn=False),
          paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models (arXiv 2412.04467)")
def visionzip_select(tokens: Tensor, k: int, ctx: Context, *, dominant: float | int = 54 / 64,
                     merge: str = "reference", order: str = "reference") -> Selection:
    """VisionZip (Sec. 3.2): ``d`` dominant tokens by CLS attention plus ``c = k − d`` merged contextual tokens.

    * ``dominant``: a fraction of ``k`` (``d = round_half_up(dominant · k)``; default ``54/64``, the paper's split)
      or an int count ``d <= k``. Dominant = top-``d`` of ``cls_attn`` (``[B, N]`` / ``[B, H, N]``; the authors sum
      over heads, the same ranking). ``tokens`` are patch tokens only: the authors' code also keeps CLS and counts
      it as one of its ``dominant`` tokens (``visionzip(model, dominant=54, contextual=10)`` keeps CLS + 53 patch
      tokens + 10 contextual), so their counts are ``keep = dominant + contextual − 1``, ``dominant = dominant − 1``
      here, with CLS re-attached in front (``vtok.patch`` does that).
    * contextual: the ``R = N − d`` remaining tokens in original order; targets are remaining positions
      ``j · max(1, R // c)`` for ``j < c`` (evenly spaced, as in the official code); every other remaining token
      joins its most cosine-similar target (first on ties), on ``keys`` (``[B, N, Dk]``, or ``[B, H, N, dh]``
      averaged over heads as the official code does) or on the tokens when no keys are given.

    Options:
        merge: ``"reference"`` (default, the authors' code): contextual token = ``target + mean(other members)``
            (the target alone when nothing joined it; with ``sizes``, the mean is size-weighted); ``"mean"``: the
            (size-weighted) mean of the whole group, target included (vtok ≤ 0.1).
        order: ``"reference"`` (default, the authors' code): emitted ``[dominant ascending, contextual by target
            position]`` (``Selection.order``); ``"position"``: ascending positions (vtok ≤ 0.1).

    Returns a merging ``Selection``: ``keep`` = dominant tokens and targets (ascending); ``assign`` maps a dominant
    token to its own slot and each contextual token to its target's slot; ``coef`` holds the reference merge.
    """
    b, n = tokens.shape[:2]
    check_choice("merge", merge, _VZ_MERGE)
    check_choice("order", order, _VZ_ORDER)
    check_k(k, n)
    if isinstance(dominant, bool) or not isinstance(dominant, (int, float)):
        raise ValueError(f"dominant must be a fraction in [0, 1] or an int count, got {dominant!r}")
    if isinstance(dominant, int):
        if not 0 <= dominant <= k:
            raise ValueError(f"dominant as a count must lie in [0, k={k}], got {dominant}")
        d = dominant
    else:
        d = min(_round_half_up(check_fraction("dominant", dominant) * k), k)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    dev = tokens.device
    c = k - d
    dom_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if d:
        dom_mask.scatter_(1, ops.stable_topk(_scores(ctx["cls_attn"]), d), True)
    if c == 0:
        return Selection.from_mask(dom_mask)
    r = n - d
    dom = _remaining(~dom_mask, d)  # [B, d] ascending
    rest = _remaining(dom_mask, r)  # [B, R] original indices, ascending
    step = max(1, r // c)
    pos = torch.arange(c, device=dev) * step
    tgt = rest[:, pos]  # [B, c] ascending
    is_tgt = torch.zeros(r, dtype=torch.bool, device=dev)
    is_tgt[pos] = True
    others = rest[:, ~is_tgt]  # [B, R - c]
    out = torch.full((b, n), -1, dtype=torch.long, device=dev)  # output index of every token (emitted order)
    out.scatter_(1, dom, torch.arange(d, device=dev).expand(b, d).contiguous())
    out.scatter_(1, tgt, torch.arange(d, k, device=dev).expand(b, c).contiguous())
    if others.shape[1]:
        feats = _features(tokens, ctx)
        _, best = ops.cosine_argmax(gather_tokens(feats, others), gather_tokens(feats, tgt))  # [B, R - c]
        out.scatter_(1, others, d + best)
    coef = None
    if merge == "reference":
        sizes = ctx.get("sizes")
        w = torch.ones(b, n, device=dev, dtype=acc(tokens).dtype) if sizes is None else sizes.to(acc(tokens).dtype)
        is_other = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, others, True)
        w_oth = torch.where(is_other, w, torch.zeros_like(w))
        total = torch.zeros(b, k, device=dev, dtype=w.dtype).scatter_add_(1, out, w_oth)
        coef = torch.where(is_other, w_oth / total.gather(1, out).clamp_min(torch.finfo(w.dtype).tiny),
                           torch.ones_like(w))
    positions = torch.cat([dom, tgt], 1)
    if order == "position":
        sel = Selection.from_emitted(positions, n, out, coef=coef)
        return Selection(sel.keep, n, sel.assign, coef=sel.coef)
    return Selection.from_emitted(positions, n, out, coef=coef)


# ---------------------------------------------------------------------------------------------------------------
# Zero-TPrune
# ---------------------------------------------------------------------------------------------------------------

def wpr_importance(attn: Tensor, iters: int = 30) -> Tensor:
    """Zero-TPrune's Weighted PageRank importance: ``s ← Aᵀ s`` from uniform ``s``, per head, averaged over heads.

    ``attn``: ``[B, N, N]`` or ``[B, H, N, N]`` (row = query). Returns ``[B, N]`` (fp32, each row sums to 1).
    """
    if attn.dim() == 3:
        return ops.pagerank(attn, iters=iters)
    b, h, n, _ = attn.shape
    return ops.pagerank(attn.reshape(b * h, n, n), iters=iters).view(b, h, n).mean(1)


@register("zero_tprune", family="attention", needs=("attn",), uses=("keys",),
          paper="Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in Pre-Trained "
                "Transformers (CVPR 2024, arXiv 2305.17328)")
def zero_tprune_select(tokens: Tensor, k: int, ctx: Context, *, s_ratio: float = 0.5, iters: int = 30) -> Selection:
    """Zero-TPrune: importance by Weighted PageRank on the attention graph (I-stage), then similarity (S-stage).

    ``attn``: ``[B, N, N]`` or ``[B, H, N, N]`` (row = query; this method truly needs the whole graph).
    Of the ``r = N − k`` tokens to remove:

    * importance (Sec. 3.1, WPR): ``s ← Aᵀ s`` from ``s = 1/N`` for ``iters`` iterations, per head, then the
      mean over heads (the paper's EIR head aggregation and variance-based head filter are not reproduced).
    * I-stage: the ``r_I = r − r_S`` least important tokens are pruned, ``r_S = min(round_half_up(s_ratio * r), k)``.
    * S-stage (Sec. 3.2, sequential importance-based partition): the ``k + r_S`` survivors split into the
      more important half (``ceil``, group B, kept) and the less important half (group A, ``>= r_S`` tokens);
      each A token is matched to its most cosine-similar B token (on ``keys``, head-averaged, else on the
      tokens) and the ``r_S`` A tokens with the highest similarity are pruned (not merged), ToMe-style.

    ``s_ratio=0`` is plain importance top-``k``. Ties → lower index (importance), and among equally similar
    A tokens the lower-importance one is pruned first.
    """
    b, n = tokens.shape[:2]
    s_ratio = check_fraction("s_ratio", s_ratio)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    r = n - k
    r_s = min(_round_half_up(s_ratio * r), k)
    imp = wpr_importance(ctx["attn"], iters=iters)
    order = _rank_order(imp)  # [B, N] most important first
    if r_s == 0:
        return Selection.from_indices(order[:, :k], n)
    survivors = order[:, :k + r_s]
    n_b = (k + r_s + 1) // 2
    grp_b, grp_a = survivors[:, :n_b], survivors[:, n_b:]  # grp_a in descending importance
    feats = _features(tokens, ctx)
    sim, _ = ops.cosine_argmax(gather_tokens(feats, grp_a), gather_tokens(feats, grp_b))
    # keep the (|A| − r_S) least similar A tokens; on equal similarity the more important (earlier) one stays
    keep_a = torch.sort(sim, dim=1, stable=True).indices[:, :grp_a.shape[1] - r_s]
    return Selection.from_indices(torch.cat([grp_b, grp_a.gather(1, keep_a)], 1), n)


# ---------------------------------------------------------------------------------------------------------------
# FastV
# ---------------------------------------------------------------------------------------------------------------

@register("fastv", family="attention", needs=("text_attn",), placement=Placement(positions="original"),
          paper="FastV: An Image is Worth 1/2 Tokens After Layer 2 (arXiv 2403.06764)")
def fastv_select(tokens: Tensor, k: int, ctx: Context, *, query_source: str = "last") -> Selection:
    """FastV (Sec. 4): after LLM layer K keep the ``k`` image tokens that receive the most attention.

    ``text_attn``: ``[B, N]`` (already reduced), ``[B, T, N]`` (one row per query token) or ``[B, H, T, N]``
    (heads averaged, as the paper does). ``query_source`` picks the query rows of a ``[B, T, N]`` /
    ``[B, H, T, N]`` input:

    * ``"last"``: the last row only — the official code's choice (the last prompt token's attention);
    * ``"all"`` / ``"text"``: the mean over all given rows (the paper's average attention received). They
      compute the same thing; they differ in what the hook passes: for ``"all"`` every query row after the
      image, for ``"text"`` only the instruction-token rows.

    (Named ``query_source`` rather than ``query`` because ``query`` is a context key.) Ties → lowest index.
    """
    b, n = tokens.shape[:2]
    check_choice("query_source", query_source, ("last", "text", "all"))
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    att = acc(ctx["text_attn"])
    if att.dim() == 4:
        att = att.mean(1)
    if att.dim() == 3:
        att = att[:, -1] if query_source == "last" else att.mean(1)
    return Selection(ops.stable_topk(att, k), n)


# ---------------------------------------------------------------------------------------------------------------
# PyramidDrop
# ---------------------------------------------------------------------------------------------------------------

@register("pdrop", family="attention", needs=("text_attn",),
          placement=Placement(positions="original", attn_layer="own"),
          paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction "
                "(arXiv 2410.17247)")
def pdrop_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """PyramidDrop (Sec. 3.2): at the end of each stage keep the ``k`` image tokens the last instruction token
    attends to most (``text_attn`` ``[B, N]``, or ``[B, T, N]`` / ``[B, H, T, N]`` reduced as FastV's ``"last"``).

    What differs from FastV is where the attention comes from, which ``vtok.wrap`` handles (``Placement.attn_layer
    = "own"``): the authors' code ranks before layer ``K`` with layer ``K``'s own ``input_layernorm``, ``q_proj`` /
    ``k_proj`` and RoPE on the hidden states entering it (FastV reads layer ``K − 1``'s attention). A pyramid is a
    list of stages, e.g. LLaVA-1.5's ``layer=[8, 16, 24], keep=[0.5, 0.25, 0.125]`` (the paper's λ = 0.5; ``keep`` is
    of the original image tokens, as their ``image_token_ratio_list``). Ties → lowest index (the authors' ``topk``
    leaves them unspecified). Difference: their code renumbers the positions of the kept sequence after each drop;
    vtok's in-LLM stages keep the tokens' original positions.
    """
    return fastv_select(tokens, k, ctx, query_source="last")
