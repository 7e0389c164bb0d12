"""Diversity strategies: keep a subset of tokens that covers the feature space (max–min / k-center).

Both methods here are *pruners* (plain gathers, no merge map): the kept tokens are real tokens in original
order. The greedy max–min loop is ``k`` sequential steps of ``O(B·N·D)`` each (``ops.farthest_point``); no
``N × N`` distance matrix is built (the DivPrune code builds one).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("divprune", family="diversity",
          paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (arXiv 2503.02175)")
def divprune(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep ``k`` of ``tokens [B, N, D]`` that greedily maximise the minimum pairwise cosine distance (DivPrune).

    DivPrune (Sec. 3, the Max–Min Diversity Problem, solved greedily as in its Algorithm 1) uses the cosine
    distance ``d(i, j) = 1 − cos(x_i, x_j)`` on the visual features. Greedy rule, as in the authors' code:

    1. the first pick is the *most isolated* token: ``argmax_i min_{j≠i} d(i, j)`` (the largest
       nearest-neighbour distance; ``ops.nearest_neighbor_distance``);
    2. then repeatedly add ``argmax_{i ∉ S} min_{j ∈ S} d(i, j)`` (``ops.farthest_point`` from that start).

    Ties go to the lowest index. Returns a plain-gather ``Selection`` with ``keep [B, k]`` sorted ascending
    (original token order). Memory is ``O(B·N)`` plus one ``chunk × N`` block for step 1.
    """
    b, n, _ = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    start = ops.nearest_neighbor_distance(tokens, metric="cosine").argmax(1)
    picks = ops.farthest_point(tokens, k, start=start, metric="cosine")
    return Selection.from_indices(picks, n)


_TODRE_STARTS = ("auto", "relevance", "central")


def task_relevance(tokens: Tensor, ctx: Context) -> Tensor | None:
    """``[B, N]`` relevance of each visual token to the task, or ``None`` when ``ctx`` has neither source.

    ``text_attn`` (``[B, N]``, ``[B, T, N]`` or ``[B, H, T, N]``) is averaged over heads and text queries;
    otherwise ``query`` (``[B, D]`` or ``[B, Q, D]``) gives the mean cosine similarity of each token to the
    query embeddings.
    """
    attn = ctx.get("text_attn")
    if attn is not None:
        a = attn.float()
        while a.dim() > 2:
            a = a.mean(1)
        return a
    query = ctx.get("query")
    if query is not None:
        q = query if query.dim() == 3 else query[:, None]
        xn = F.normalize(tokens.float(), dim=-1)
        qn = F.normalize(q.float(), dim=-1)
        return torch.einsum("bnd,bqd->bn", xn, qn) / q.shape[1]
    return None


@register("todre", family="diversity", uses=("text_attn", "query"),
          paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
                "Vision-Language Models (arXiv 2505.18757)")
def todre(tokens: Tensor, k: int, ctx: Context, *, start: str = "auto", candidates: float = 1.0) -> Selection:
    """ToDRE's pre-LLM stage: greedy k-center (farthest point, cosine distance) over ``tokens [B, N, D]``.

    ToDRE (Sec. 3, "diversity-driven token selection") keeps a small diverse subset after the vision encoder with
    the greedy k-center algorithm: start from one token, then repeatedly add the token farthest (cosine distance)
    from the already-chosen set (``ops.farthest_point``; ties → lowest index). Its second stage — dropping *all*
    visual tokens inside the LLM at a layer after which task relevance has vanished ("information migration") —
    needs the LLM's text-to-image attention at that layer and belongs to the in-LLM hook, not here.

    Options:
        start: the first center. ``"relevance"``: the token most relevant to the task (``text_attn`` averaged over
            heads / text queries, else mean cosine similarity to ``query``); ``"central"``: the most representative
            token, the one with the highest mean cosine similarity to all tokens (``x̂_i · mean_j x̂_j``, ``O(N·D)``);
            ``"auto"`` (default): ``"relevance"`` when ``text_attn`` or ``query`` is given, else ``"central"``.
        candidates: ``>= 1``. Greedy k-center first picks ``min(N, ceil(candidates · k))`` diverse candidates; with
            a relevance signal the ``k`` most relevant of them are kept (a pre-LLM stand-in for ToDRE's task-relevance
            filter). ``1.0`` (default) is pure k-center as in the paper's first stage. Without a relevance signal
            the first ``k`` greedy picks are kept (the greedy order is prefix-consistent, so this equals ``1.0``).

    Returns a plain-gather ``Selection``, ``keep [B, k]`` ascending.
    """
    if start not in _TODRE_STARTS:
        raise ValueError(f"start must be one of {_TODRE_STARTS}, got {start!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) or not candidates >= 1.0:
        raise ValueError(f"candidates must be a number >= 1.0, got {candidates!r}")
    b, n, _ = tokens.shape
    relevance = task_relevance(tokens, ctx)
    if start == "relevance" and relevance is None:
        raise ValueError("start='relevance' needs context 'text_attn' or 'query'")
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    if start == "central" or (start == "auto" and relevance is None):
        xn = F.normalize(tokens.float(), dim=-1)
        first = (xn * xn.mean(1, keepdim=True)).sum(-1).argmax(1)
    else:
        first = relevance.argmax(1)
    m = max(k, min(n, math.ceil(candidates * k - 1e-9)))
    picks = ops.farthest_point(tokens, m, start=first, metric="cosine")
    if m > k and relevance is not None:
        chosen = ops.stable_topk(relevance.gather(1, picks), k)  # positions within picks
        picks = picks.gather(1, chosen)
    else:
        picks = picks[:, :k]
    return Selection.from_indices(picks, n)
