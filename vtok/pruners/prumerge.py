"""LLaVA-PruMerge and its variant PruMerge+ (arXiv 2403.15388): [CLS]-attention outliers (PruMerge+: plus
spatially uniform tokens) kept, every pruned token merged into its most key-similar kept token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._attention import FEATURE_LAYER, head_mean, match_features, rank_order, remaining
from vtok.pruners._checks import check_fraction, check_k
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens

_PM_MERGE = ("reference", "mean")
_PM_ORDER = ("reference", "position")


def iqr_outliers(scores: Tensor, whisker: float = 1.5) -> Tensor:
    """``[B, N]`` boolean: ``scores [B, N]`` (or per head ``[B, H, N]``, head-averaged) above ``Q3 + whisker · IQR``.

    PruMerge's adaptive selection (Sec. 3, interquartile-range outlier detection on [CLS] attention); quartiles by
    linear interpolation (numpy's default ``percentile``, as the authors' code), per sample (the code pools the
    whole batch), in float64 (the code casts to float32 first).
    """
    s = head_mean(scores)
    q = torch.quantile(s.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=s.device), dim=1)  # [2, B]
    upper = q[1] + whisker * (q[1] - q[0])
    return s.double() > upper[:, None]


def _outlier_counts(score: Tensor) -> list[int]:
    """Per sample, the IQR outlier count ``m`` of ``score [B, N]``, at least 1."""
    return [max(1, int(c)) for c in iqr_outliers(score).sum(1).tolist()]


def plus_grid(m: int, n: int) -> list[int]:
    """PruMerge+'s spatially uniform positions for ``m`` outliers among ``n`` tokens, as the authors' code spells them:
    ``range(0, n − 1, s)`` with ``s = int(int(1 / (m / n)) / 3)`` (their ``arange(0, 575, int(step_length / 3))``,
    ``step_length = int(1 / reduction_ratio)``, ``reduction_ratio = m / N``; their ``575`` is ``N − 1`` at LLaVA-1.5's
    ``N = 576``), the stride at least 1. The outliers are removed from it by the caller."""
    stride = max(1, int(int(1 / (m / n)) / 3))
    return list(range(0, n - 1, stride))


def prumerge_budget(cls_attn: Tensor, *, plus: bool = False) -> Tensor:
    """``LongTensor [B]``: the adaptive token count of PruMerge (``plus=False``) or PruMerge+ for each sample.

    PruMerge keeps the ``m`` IQR outliers (:func:`iqr_outliers`, at least 1). PruMerge+ (``plus=True``) adds the
    positions of :func:`plus_grid` that are not outliers, as the authors' code does: ``m + |{0, s, 2s, …} \\ outliers|``
    with ``s = int(int(N / m) / 3)``, their exact count (without the extra token their code appends, see
    :func:`prumerge_select`). At that ``k``, ``prumerge_plus``'s default keeps exactly their tokens. Use it as
    ``keep=int(prumerge_budget(cls_attn)[0])`` for one image (vtok budgets are one ``k`` per call).
    """
    score = head_mean(cls_attn)
    m = iqr_outliers(score).sum(1).clamp_min(1)
    if not plus:
        return m
    n = score.shape[-1]
    rank = rank_order(score)
    counts = []
    for b, mb in enumerate(m.tolist()):
        top = set(rank[b, :mb].tolist())
        counts.append(mb + sum(1 for p in plus_grid(mb, n) if p not in top))
    return torch.tensor(counts, dtype=torch.long, device=score.device)


def _spread(pool: Tensor, count: int) -> Tensor:
    """``count`` evenly spaced entries of the 1-D ``pool`` (``pool[(j · len) // count]``, the first at ``pool[0]``)."""
    return pool[(torch.arange(count, device=pool.device) * pool.shape[0]) // count]


def _plus_picks(score: Tensor, k: int) -> Tensor:
    """``[B, k]`` PruMerge+'s tokens in the authors' emission order: the ``d = min(m, k)`` IQR outliers by descending
    score, then the uniform tokens ascending: :func:`plus_grid` less the outliers when it holds exactly ``k − d`` of
    them (``k = prumerge_budget(..., plus=True)``), ``k − d`` evenly spaced ones of it when it holds more, all of it
    plus evenly spaced others when it holds fewer."""
    b, n = score.shape
    dev = score.device
    rank = rank_order(score)
    rows = []
    for i, m in enumerate(_outlier_counts(score)):
        d = min(m, k)
        top, c = rank[i, :d], k - d
        if c == 0:
            rows.append(top)
            continue
        taken = torch.zeros(n, dtype=torch.bool, device=dev)
        taken[top] = True
        grid = torch.tensor(plus_grid(m, n), dtype=torch.long, device=dev)
        grid = grid[~taken[grid]]
        if grid.shape[0] >= c:
            uniform = _spread(grid, c)
        else:
            taken[grid] = True
            uniform = torch.cat([grid, _spread((~taken).nonzero().squeeze(1), c - grid.shape[0])]).sort().values
        rows.append(torch.cat([top, uniform]))
    return torch.stack(rows)


def _share_picks(score: Tensor, k: int, d: int) -> Tensor:
    """``[B, k]``: the top-``d`` tokens by descending score, then ``k − d`` evenly spaced other tokens ascending."""
    b, n = score.shape
    rank = rank_order(score)
    top = rank[:, :d]
    if k == d:
        return top
    taken = torch.zeros(b, n, dtype=torch.bool, device=score.device).scatter_(1, top, True)
    rest = remaining(taken, n - d)  # [B, n - d] ascending
    pos = (torch.arange(k - d, device=score.device) * (n - d)) // (k - d)  # evenly spaced, first at 0
    return torch.cat([top, rest[:, pos]], 1)


def _prumerge(tokens: Tensor, ctx: Context, picks: Tensor, merge: str, order: str) -> Selection:
    """Keep ``picks [B, k]`` (emitted order); merge every other token into its most key-similar kept token (see
    :func:`prumerge_select`)."""
    b, n = tokens.shape[:2]
    k = picks.shape[1]
    dev = tokens.device
    keep, slot_to_out = picks.sort(1)  # [B, k] ascending; slot s is emitted at slot_to_out[s]
    pruned_mask = torch.ones(b, n, dtype=torch.bool, device=dev).scatter_(1, keep, False)
    pruned = remaining(~pruned_mask, n - k)  # [B, n - k]
    slot = torch.full((b, n), -1, dtype=torch.long, device=dev)
    slot.scatter_(1, keep, torch.arange(k, device=dev).expand(b, k).contiguous())
    keys = ctx.get("keys")
    if keys is not None and keys.dim() == 4:  # [B, H, N, dh] → [B, N, H·dh]: k_proj output, heads concatenated
        feats = acc(keys).permute(0, 2, 1, 3).reshape(b, n, -1)
    else:
        feats = match_features(tokens, ctx)
    _, best = ops.cosine_argmax(gather_tokens(feats, pruned), gather_tokens(feats, keep))  # [B, n - k]
    slot.scatter_(1, pruned, best)
    a = head_mean(ctx["cls_attn"]).to(acc(tokens).dtype)
    is_kept = ~pruned_mask
    if merge == "reference":
        coef = torch.where(is_kept, torch.ones_like(a), a)
    else:
        w = a.clamp_min(0)
        den = torch.zeros(b, k, dtype=a.dtype, device=dev).scatter_add_(1, slot, w)
        cnt = torch.zeros(b, k, dtype=a.dtype, device=dev).scatter_add_(1, slot, torch.ones_like(w))
        den_t, cnt_t = den.gather(1, slot), cnt.gather(1, slot)
        coef = torch.where(den_t > 0, w / den_t.clamp_min(torch.finfo(a.dtype).tiny), 1.0 / cnt_t)
    emit = None
    ar = torch.arange(k, device=dev).expand(b, k)
    if order == "reference" and not bool((slot_to_out == ar).all()):
        emit = torch.empty_like(slot_to_out).scatter_(1, slot_to_out, ar.contiguous())  # output j holds slot emit[j]
    return Selection(keep, n, slot, order=emit, coef=coef)


def _check_options(merge: object, order: object) -> None:
    if merge not in _PM_MERGE:
        raise ValueError(f"merge must be one of {list(_PM_MERGE)}, got {merge!r}")
    if order not in _PM_ORDER:
        raise ValueError(f"order must be one of {list(_PM_ORDER)}, got {order!r}")


@register("prumerge", family="attention", needs=("cls_attn",), uses=("keys",), merges=True, placement=FEATURE_LAYER,
          paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models (arXiv 2403.15388)")
def prumerge_select(tokens: Tensor, k: int, ctx: Context, *, merge: str = "reference",
                    order: str = "reference") -> Selection:
    """PruMerge: keep the top-``k`` [CLS]-attention tokens and merge every pruned token into its nearest kept one.

    Paper Sec. 3 (Algorithm 1): (1) the kept tokens are the outliers of the [CLS] attention (IQR rule,
    ``> Q3 + 1.5 IQR``), an *adaptive* count; (2) each kept token gathers its key-similar pruned tokens; (3) they
    are merged weighted by their [CLS] attention. vtok budgets are exact, so the count is ``k``: the top-``k`` by the
    same score — the IQR outliers when ``k = prumerge_budget(cls_attn)`` (:func:`prumerge_budget`, the adaptive
    option). ``cls_attn`` ``[B, N]`` / ``[B, H, N]`` (head-averaged), similarity = cosine on ``keys`` (``[B, N, Dk]``,
    or ``[B, H, N, dh]`` with the heads concatenated, as the code's ``k_proj`` output; the tokens without keys).

    Options:
        merge: every pruned token joins its most key-similar kept token (a partition, first on ties).
            ``"reference"`` (default) weights as the authors' code: ``y_i = x_i + Σ_j a_j x_j`` (unnormalised
            attention weights ``a_j``, the kept token itself with weight 1); ``"mean"``: the paper's
            attention-weighted average ``Σ a_j x_j / Σ a_j`` over the group, kept token included.
        order: ``"reference"`` (default, the authors' code, whose ``topk`` output goes to the projector and the LLM
            unsorted): emitted by descending [CLS] attention (``Selection.order``; ties → lowest index);
            ``"position"``: ascending positions (vtok before issue #30). ``keep`` is ascending either way.

    Differences from the authors' code, which vtok's one-slot-per-token ``Selection`` cannot express: the code adds
    to each kept token its 32 most key-similar tokens among *all* others (overlapping neighbourhoods, other kept
    tokens included) and appends one extra token ``Σ_pruned a_j x_j`` after the kept ones (``k + 1`` outputs); here
    neighbourhoods are disjoint and the budget is exactly ``k``. Its [CLS] attention and keys are the ``q_proj`` /
    ``k_proj`` outputs of the *last* CLIP block (block 23 of 24, run on the feature-layer output) as one head over
    all channels (scale ``C^-0.5``); vtok's hooks give the head-averaged [CLS] row and keys of the block that
    *produces* the feature layer (block 22), as for VisionZip. At ``k == N`` the identity (ascending).
    """
    b, n = tokens.shape[:2]
    _check_options(merge, order)
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return _prumerge(tokens, ctx, rank_order(head_mean(ctx["cls_attn"]))[:, :k], merge, order)


@register("prumerge_plus", family="attention", needs=("cls_attn",), uses=("keys",), merges=True,
          placement=FEATURE_LAYER,
          paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models, PruMerge+ "
                "(arXiv 2403.15388)")
def prumerge_plus_select(tokens: Tensor, k: int, ctx: Context, *, outlier_share: float | None = None,
                         merge: str = "reference", order: str = "reference") -> Selection:
    """PruMerge+: PruMerge's [CLS]-attention outliers plus spatially uniform tokens, pruned tokens merged in.

    Paper Sec. 3 (PruMerge+): the outlier tokens are supplemented with spatially uniformly sampled ones, then
    merging proceeds as in :func:`prumerge_select` (same ``merge`` / ``order`` options and differences from the
    code).

    Options:
        outlier_share: ``None`` (default, the authors' code): the ``d = min(m, k)`` IQR outliers (``m`` per sample,
            :func:`iqr_outliers`, at least 1) and the uniform positions of their code, ``{0, s, 2s, …} < N − 1`` with
            ``s = int(int(N / m) / 3)`` (:func:`plus_grid`) less the outliers. At ``k = prumerge_budget(cls_attn,
            plus=True)`` these are exactly their tokens; at a larger ``k`` the rest are evenly spaced among the
            remaining tokens, at a smaller one ``k − d`` evenly spaced positions of that grid are kept. A number in
            ``[0, 1]``: ``d = round_half_up(outlier_share · k)`` top tokens and ``k − d`` evenly spaced (first at 0)
            among the rest, whatever the outliers (``0.25`` was the default before issue #30).
        order: ``"reference"`` (default): emitted ``[outliers by descending attention, uniform ascending]`` as the
            authors' code; ``"position"``: ascending positions.
    """
    b, n = tokens.shape[:2]
    _check_options(merge, order)
    share = None if outlier_share is None else check_fraction("outlier_share", outlier_share)
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    score = head_mean(ctx["cls_attn"])
    if share is None:
        picks = _plus_picks(score, k)
    else:
        picks = _share_picks(score, k, min(k, int(math.floor(share * k + 0.5))))
    return _prumerge(tokens, ctx, picks, merge, order)
