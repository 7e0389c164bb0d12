"""VisionZip (arXiv 2412.04467): dominant tokens by [CLS] attention plus contextual tokens merged into evenly
spaced targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._attention import head_mean, match_features, remaining, round_half_up
from vtok.pruners._checks import check_choice, check_fraction, check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection, gather_tokens

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
        d = min(round_half_up(check_fraction("dominant", dominant) * k), k)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    dev = tokens.device
    c = k - d
    dom_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if d:
        dom_mask.scatter_(1, ops.stable_topk(head_mean(ctx["cls_attn"]), d), True)
    if c == 0:
        return Selection.from_mask(dom_mask)
    r = n - d
    dom = remaining(~dom_mask, d)  # [B, d] ascending
    rest = remaining(dom_mask, r)  # [B, R] original indices, ascending
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
        feats = match_features(tokens, ctx)
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
