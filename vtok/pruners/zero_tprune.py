"""Zero-TPrune (CVPR 2024, arXiv 2305.17328): Weighted PageRank importance on the attention graph, then
similarity-based pruning of the less important half.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._attention import match_features, rank_order, round_half_up
from vtok.pruners._checks import check_fraction, check_int, check_k
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


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
    check_k(k, n)
    s_ratio = check_fraction("s_ratio", s_ratio)
    iters = check_int("iters", iters, 1)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    r = n - k
    r_s = min(round_half_up(s_ratio * r), k)
    imp = wpr_importance(ctx["attn"], iters=iters)
    order = rank_order(imp)  # [B, N] most important first
    if r_s == 0:
        return Selection.from_indices(order[:, :k], n)
    survivors = order[:, :k + r_s]
    n_b = (k + r_s + 1) // 2
    grp_b, grp_a = survivors[:, :n_b], survivors[:, n_b:]  # grp_a in descending importance
    feats = match_features(tokens, ctx)
    sim, _ = ops.cosine_argmax(gather_tokens(feats, grp_a), gather_tokens(feats, grp_b))
    # keep the (|A| − r_S) least similar A tokens; on equal similarity the more important (earlier) one stays
    keep_a = torch.sort(sim, dim=1, stable=True).indices[:, :grp_a.shape[1] - r_s]
    return Selection.from_indices(torch.cat([grp_b, grp_a.gather(1, keep_a)], 1), n)
