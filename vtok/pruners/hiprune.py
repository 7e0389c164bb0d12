"""HiPrune (arXiv 2508.00553): anchor, buffer and register tokens from the vision encoder's attention
hierarchy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._attention import head_mean, rank_order, round_half_up
from vtok.pruners._checks import check_fraction, check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


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
    mid = head_mean(ctx["mid_attn"])
    deep = head_mean(ctx["cls_attn"])
    a = min(round_half_up(alpha * k / 5.0), k)
    anchor = torch.zeros(b, n, dtype=torch.bool, device=mid.device)
    if a:
        anchor.scatter_(1, ops.stable_topk(mid, a), True)
    buffer = _grid_neighbours(anchor, h, w) & ~anchor
    tier = anchor.to(torch.uint8) * 2 + buffer.to(torch.uint8)  # 2 anchor, 1 buffer, 0 register candidate
    value = torch.where(tier > 0, mid, deep)
    order = rank_order(value)  # by value, ties → lowest index
    order = order.gather(1, torch.sort(tier.gather(1, order), dim=1, descending=True, stable=True).indices)
    return Selection.from_indices(order[:, :k], n)
