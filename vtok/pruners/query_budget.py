"""QuoTA (arXiv 2503.08689): per-frame budgets in proportion to each frame's relevance to the query, with a floor,
then an image strategy inside each frame.

On video tokens ``[B, T·P, D]``, frame-major (``frames=T`` in context, ``grid=(h, w)`` the grid of one frame);
see ``vtok.pruners._video``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels.reference import acc
from vtok.pruners._video import allocate, frame_layout, run_per_frame
from vtok.pruners.registry import register
from vtok.selection import Selection

QUOTA = "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension (arXiv 2503.08689)"


def frame_relevance(tokens: Tensor, ctx: Context) -> Tensor:
    """``[B, T]``: ``frame_scores`` when given, else the cosine similarity of ``query`` (mean over its rows) with each
    frame's mean token."""
    if "frame_scores" in ctx:
        return acc(ctx["frame_scores"])
    if "query" not in ctx:
        raise ValueError("query_budget needs a relevance per frame: pass frame_scores=[B, T] (e.g. text-frame "
                         "similarity) or query=[B, D] / [B, Q, D] (a text embedding in the tokens' space)")
    b, n, d = tokens.shape
    t = int(ctx["frames"])
    q = acc(ctx["query"])
    q = q.mean(1) if q.dim() == 3 else q
    means = acc(tokens.detach()).reshape(b, t, n // t, d).mean(2).to(q.dtype)
    return torch.nn.functional.cosine_similarity(means, q[:, None, :], dim=-1)


def query_budgets(scores: Tensor, k: int, p: int, floor: int | float) -> Tensor:
    """``[B, T]`` per-frame budgets: every frame gets the floor ``f`` (an int count, or a float share of the even
    split ``k / T``; at most ``min(P, k // T)``), the remaining ``k − T·f`` tokens go to the frames in proportion to
    ``max(score, 0)`` (:func:`allocate`, each frame capped at ``P``)."""
    b, t = scores.shape
    if isinstance(floor, bool) or not isinstance(floor, numbers.Real) or floor < 0:
        raise ValueError(f"floor must be an int count >= 0 or a float share in [0, 1], got {floor!r}")
    if isinstance(floor, numbers.Integral):
        f = int(floor)
    else:
        if floor > 1:
            raise ValueError(f"floor as a share of the even split must lie in [0, 1], got {floor}")
        f = int(float(floor) * k / t)
    f = min(f, p, k // t)
    rows = []
    for row in scores:
        rows.append(f + allocate(k - t * f, row, torch.full((t,), p - f, dtype=torch.long)))
    return torch.stack(rows)


@register("query_budget", family="temporal", needs=("frames",), uses=("frame_scores", "query", "grid"), paper=QUOTA)
def query_budget(tokens: Tensor, k: int, ctx: Context, *, strategy: str = "divprune", floor: int | float = 0.25,
                 options: Mapping[str, Any] | None = None) -> Selection:
    """Give each frame a budget proportional to its relevance to the query, with a floor, then prune inside it (QuoTA).

    QuoTA (arXiv 2503.08689) scores every frame's relevance to the (decoupled) question with a VLM and
    assigns token budgets in proportion to the scores before the LLM. Here the score is ``frame_scores`` from context
    (any relevance, e.g. CLIP text–frame similarity, the light variant the notes name) or, without it, the cosine of
    ``query`` with each frame's mean token (:func:`frame_relevance`); negative scores count as 0. Budgets:
    :func:`query_budgets` (every frame at least ``floor``); then the image strategy ``strategy`` (any registered one,
    with ``options``) keeps that many tokens inside each frame (:func:`run_per_frame`).
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    scores = frame_relevance(tokens, ctx)
    budgets = query_budgets(scores, k, p, floor)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return run_per_frame(tokens, ctx, budgets, strategy, options)
