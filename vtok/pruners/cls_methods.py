"""Encoder-side [CLS]-attention methods for VLMs (issue #19): FasterVLM, VisPruner, LLaVA-PruMerge / PruMerge+.

All three read the vision encoder's [CLS] attention at the feature layer (``cls_attn``, ``[B, N]`` or per head
``[B, H, N]``, head-averaged as the authors' code does) and run before the LLM, on the patch features the
projector receives. Where the authors' public code and the paper text differ, vtok follows the code by default and
the docstrings say where. Ties go to the lowest token index (the authors use ``torch.topk`` / ``argsort``, whose
tie order is unspecified). Every strategy returns the identity at ``k == N``.

Shapes: ``B`` batch, ``N`` tokens, ``D`` features, ``H`` heads, ``Dk`` key features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.pruners.attention import (
    _acc,
    _check_fraction,
    _check_k,
    _features,
    _rank_order,
    _remaining,
    _scores,
)
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection, gather_tokens

# The feature layer of LLaVA (CLIP's penultimate block output), where these methods read [CLS] attention.
_FEATURE_LAYER = Placement(layer=-2, at="output", prop_attn=False)


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# FasterVLM
# ---------------------------------------------------------------------------------------------------------------

@register("fastervlm", family="attention", needs=("cls_attn",), placement=_FEATURE_LAYER,
          paper="FasterVLM: [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM "
                "Inference Faster (arXiv 2412.01818 v1)")
def fastervlm_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """FasterVLM: keep the ``k`` patch tokens with the highest [CLS] attention at the encoder's feature layer.

    Paper Sec. 3 (the [CLS] attention ``softmax(q_cls K^T / sqrt(d))`` of the layer whose output LLaVA feeds the
    projector, averaged over heads, ranks the patch tokens; the top ones are kept before the projector). The
    authors' code reads ``attentions[select_layer]`` (layer −2), row 0 (CLS), patch columns, mean over heads, then
    ``topk`` and an index mask, so the kept tokens stay in original order — as here. ``tokens [B, N, D]``,
    ``cls_attn`` ``[B, N]`` / ``[B, H, N]``. The ranking is the same as ``cls_attn``'s; ``fastervlm`` differs in its
    default placement (the feature layer's output, layer −2, as in the paper).
    """
    b, n = tokens.shape[:2]
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(_scores(ctx["cls_attn"]), k), n)


# ---------------------------------------------------------------------------------------------------------------
# VisPruner
# ---------------------------------------------------------------------------------------------------------------

def vispruner_diverse(xn: Tensor, residual: Tensor, count: int, per_step: int = 8) -> Tensor:
    """VisPruner's duplicate removal: shrink ``residual [B, R]`` (token indices) to ``[B, count]`` diverse ones.

    ``xn [B, N, D]``: L2-normalised features. Each round splits the current residual list alternately
    (``a`` = even positions, ``b`` = odd positions), scores every ``a`` token by its highest cosine similarity to
    ``b`` and drops the ``r = min(per_step, R − count, |a|)`` most similar ``a`` tokens; the new list is
    ``[kept a in descending similarity, b]`` (the authors' order, which the next round's split depends on).
    Ties: among equally similar ``a`` tokens the earlier one in the list is dropped first. Where one sample's
    ``N × N`` matrix fits ``reference.GRAM_MAX_ELEMENTS``, its cosine matrix is computed once (one GEMM) and each
    round reads its ``|a| × |b|`` block; otherwise each round runs ``bmm`` over the batch in column blocks of
    ``reference.DEFAULT_CHUNK`` (memory ``O(B · |a| · chunk)``).
    """
    b, n = xn.shape[:2]
    if ref.gram_groups(1, n) is not None:  # per sample: one GEMM, then each round reads an |a| x |b| block
        out = []
        for i in range(b):
            gram, res = xn[i] @ xn[i].T, residual[i]
            while res.shape[0] > count:
                a_idx, b_idx = res[::2], res[1::2]
                r = min(per_step, res.shape[0] - count, a_idx.shape[0])
                sim = gram.index_select(0, b_idx).amax(0)[a_idx]  # symmetric: max over b rows, read at a
                keep_a = torch.sort(sim, descending=True, stable=True).indices[r:]
                res = torch.cat([a_idx[keep_a], b_idx])
            out.append(res)
        return torch.stack(out)
    chunk = ref.DEFAULT_CHUNK
    while residual.shape[1] > count:
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        r = min(per_step, residual.shape[1] - count, a_idx.shape[1])
        xa = gather_tokens(xn, a_idx)
        sim = torch.stack([torch.bmm(xa, gather_tokens(xn, b_idx[:, c:c + chunk]).transpose(1, 2)).amax(-1)
                           for c in range(0, b_idx.shape[1], chunk)]).amax(0)  # [B, |a|], O(B·|a|·chunk) memory
        keep_a = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([a_idx.gather(1, keep_a), b_idx], 1)
    return residual


@register("vispruner", family="attention", needs=("cls_attn",), placement=_FEATURE_LAYER,
          paper="VisPruner: Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs "
                "(ICCV 2025; arXiv 2412.01818 v2+, the revised FasterVLM paper)")
def vispruner_select(tokens: Tensor, k: int, ctx: Context, *, important_ratio: float = 0.5,
                     per_step: int = 8) -> Selection:
    """VisPruner: important tokens by [CLS] attention plus diverse tokens left after removing near-duplicates.

    Paper Sec. 4 (method): ``k_imp = floor(important_ratio · k)`` *important* tokens are the top of the
    head-averaged ``cls_attn`` (``[B, N]`` / ``[B, H, N]``); the other ``N − k_imp`` tokens, in descending attention
    order, are thinned to ``k − k_imp`` *diverse* tokens by repeated similarity-based duplicate removal
    (:func:`vispruner_diverse`: alternate split, drop the ``per_step`` tokens most cosine-similar to the other
    half, repeat), on the tokens themselves (the feature-layer outputs, as the authors' code does).

    Options (the authors' code defaults): ``important_ratio`` in ``[0, 1]`` (``0.5``; ``floor`` as in their
    ``int(T · r)``), ``per_step`` ≥ 1 tokens removed per round (``8``). Differences from the authors' code: a round
    never removes more than the ``a`` half holds (their code breaks there for tiny residual lists) and odd-length
    lists are split ``ceil`` / ``floor`` (their code needs an even length). Returns ``keep [B, k]`` ascending.
    """
    b, n = tokens.shape[:2]
    important_ratio = _check_fraction("important_ratio", important_ratio)
    per_step = _check_int("per_step", per_step, 1)
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    n_imp = min(int(k * important_ratio), k)
    order = _rank_order(_scores(ctx["cls_attn"]))  # [B, N] descending attention, ties → lowest index
    if n_imp == k:
        return Selection.from_indices(order[:, :k], n)
    xn = F.normalize(_acc(tokens), dim=-1)
    diverse = vispruner_diverse(xn, order[:, n_imp:], k - n_imp, per_step)
    return Selection.from_indices(torch.cat([order[:, :n_imp], diverse], 1), n)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA-PruMerge / PruMerge+
# ---------------------------------------------------------------------------------------------------------------

_PM_MERGE = ("reference", "mean")


def iqr_outliers(scores: Tensor, whisker: float = 1.5) -> Tensor:
    """``[B, N]`` boolean: ``scores [B, N]`` (or per head ``[B, H, N]``, head-averaged) above ``Q3 + whisker · IQR``.

    PruMerge's adaptive selection (Sec. 3, interquartile-range outlier detection on [CLS] attention); quartiles by
    linear interpolation (numpy's default ``percentile``, as the authors' code), per sample (the code pools the
    whole batch).
    """
    s = _scores(scores)
    q = torch.quantile(s.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=s.device), dim=1)  # [2, B]
    upper = q[1] + whisker * (q[1] - q[0])
    return s.double() > upper[:, None]


def prumerge_budget(cls_attn: Tensor, *, plus: bool = False) -> Tensor:
    """``LongTensor [B]``: the adaptive token count of PruMerge (``plus=False``) or PruMerge+ for each sample.

    PruMerge keeps the ``m`` IQR outliers (:func:`iqr_outliers`); PruMerge+ adds spatially uniform tokens, about
    ``3 m`` of them in the authors' code (a stride of a third of ``N / m``), so ``plus=True`` gives
    ``min(N, 4 m)`` — the ``k`` for which ``prumerge_plus``'s default ``outlier_share=0.25`` reproduces the split.
    At least 1. Use it as ``keep=int(prumerge_budget(cls_attn)[0])`` for one image (vtok budgets are one ``k`` per
    call).
    """
    m = iqr_outliers(cls_attn).sum(1).clamp_min(1)
    n = cls_attn.shape[-1]
    return (4 * m).clamp_max(n) if plus else m


def _prumerge(tokens: Tensor, k: int, ctx: Context, d: int, merge: str) -> Selection:
    """Keep the top-``d`` tokens by ``cls_attn`` plus ``k − d`` evenly spaced other tokens; merge every other token
    into its most key-similar kept token (see :func:`prumerge_select`)."""
    b, n = tokens.shape[:2]
    dev = tokens.device
    score = _scores(ctx["cls_attn"])
    top = torch.zeros(b, n, dtype=torch.bool, device=dev)
    top.scatter_(1, ops.stable_topk(score, d), True)
    c = k - d
    if c:
        rest = _remaining(top, n - d)  # [B, n - d] ascending
        pos = (torch.arange(c, device=dev) * (n - d)) // c  # evenly spaced, first at 0 (as the code's stride)
        top.scatter_(1, rest[:, pos], True)
    keep = _remaining(~top, k)  # [B, k] ascending
    pruned = _remaining(top, n - k)  # [B, n - k]
    slot = torch.full((b, n), -1, dtype=torch.long, device=dev)
    slot.scatter_(1, keep, torch.arange(k, device=dev).expand(b, k).contiguous())
    keys = ctx.get("keys")
    if keys is not None and keys.dim() == 4:  # [B, H, N, dh] → [B, N, H·dh]: k_proj output, heads concatenated
        feats = _acc(keys).permute(0, 2, 1, 3).reshape(b, n, -1)
    else:
        feats = _features(tokens, ctx)
    _, best = ops.cosine_argmax(gather_tokens(feats, pruned), gather_tokens(feats, keep))  # [B, n - k]
    slot.scatter_(1, pruned, best)
    a = score.to(_acc(tokens).dtype)
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, keep, True)
    if merge == "reference":
        coef = torch.where(is_kept, torch.ones_like(a), a)
    else:
        w = a.clamp_min(0)
        den = torch.zeros(b, k, dtype=a.dtype, device=dev).scatter_add_(1, slot, w)
        cnt = torch.zeros(b, k, dtype=a.dtype, device=dev).scatter_add_(1, slot, torch.ones_like(w))
        den_t, cnt_t = den.gather(1, slot), cnt.gather(1, slot)
        coef = torch.where(den_t > 0, w / den_t.clamp_min(torch.finfo(a.dtype).tiny), 1.0 / cnt_t)
    return Selection(keep, n, slot, coef=coef)


def _check_merge(merge: object) -> None:
    if merge not in _PM_MERGE:
        raise ValueError(f"merge must be one of {list(_PM_MERGE)}, got {merge!r}")


@register("prumerge", family="attention", needs=("cls_attn",), uses=("keys",), merges=True, placement=_FEATURE_LAYER,
          paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv 2403.15388)")
def prumerge_select(tokens: Tensor, k: int, ctx: Context, *, merge: str = "reference") -> Selection:
    """PruMerge: keep the top-``k`` [CLS]-attention tokens and merge every pruned token into its nearest kept one.

    Paper Sec. 3 (Algorithm 1): (1) the kept tokens are the outliers of the [CLS] attention (IQR rule,
    ``> Q3 + 1.5 IQR``), an *adaptive* count; (2) each kept token gathers its key-similar pruned tokens; (3) they
    are merged weighted by their [CLS] attention. vtok budgets are exact, so the count is ``k``: the top-``k`` by the
    same score — the IQR outliers when ``k = prumerge_budget(cls_attn)`` (:func:`prumerge_budget`, the adaptive
    option). ``cls_attn`` ``[B, N]`` / ``[B, H, N]`` (head-averaged), similarity = cosine on ``keys`` (``[B, N, Dk]``,
    or ``[B, H, N, dh]`` with the heads concatenated, as the code's ``k_proj`` output; the tokens without keys).

    Merging: every pruned token joins its most key-similar kept token (a partition, first on ties).
    ``merge="reference"`` (default) weights as the authors' code: ``y_i = x_i + Σ_j a_j x_j`` (unnormalised
    attention weights ``a_j``, the kept token itself with weight 1); ``"mean"``: the paper's attention-weighted
    average ``Σ a_j x_j / Σ a_j`` over the group, kept token included. Differences from the authors' code, which vtok's
    one-slot-per-token ``Selection`` cannot express: the code adds to each kept token its 32 most key-similar tokens
    among *all* others (overlapping neighbourhoods, other kept tokens included), computes its [CLS] attention as a
    single head over the concatenated ``q``/``k`` of the last block, and appends one extra token
    ``Σ_pruned a_j x_j`` (``k + 1`` outputs); here neighbourhoods are disjoint and the budget is exactly ``k``.
    """
    b, n = tokens.shape[:2]
    _check_merge(merge)
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return _prumerge(tokens, k, ctx, k, merge)


@register("prumerge_plus", family="attention", needs=("cls_attn",), uses=("keys",), merges=True,
          placement=_FEATURE_LAYER,
          paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models, PruMerge+ "
                "(arXiv 2403.15388)")
def prumerge_plus_select(tokens: Tensor, k: int, ctx: Context, *, outlier_share: float = 0.25,
                         merge: str = "reference") -> Selection:
    """PruMerge+: PruMerge's [CLS]-attention outliers plus spatially uniform tokens, pruned tokens merged in.

    Paper Sec. 3 (PruMerge+): the outlier tokens are supplemented with spatially uniformly sampled ones, then
    merging proceeds as in :func:`prumerge_select` (same ``merge`` options and differences from the code). With an
    exact budget ``k``: ``d = round_half_up(outlier_share · k)`` tokens by [CLS] attention and ``k − d`` tokens evenly
    spaced (in row-major order, the first at position 0) among the rest. ``outlier_share=0.25`` reproduces the
    authors' code, whose uniform stride is a third of ``N / m`` for ``m`` outliers (≈ ``3 m`` uniform tokens:
    ``prumerge_budget(cls_attn, plus=True)`` gives the adaptive ``k = 4 m``); their sequence covers all positions
    and skips the outliers, here the evenly spaced positions are taken among the non-outliers so the count is exact.
    """
    b, n = tokens.shape[:2]
    _check_merge(merge)
    share = _check_fraction("outlier_share", outlier_share)
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    d = min(k, int(math.floor(share * k + 0.5)))
    return _prumerge(tokens, k, ctx, d, merge)
