"""ToDRE (arXiv 2505.18757): greedy max-sum diversification (v2) or greedy k-center (v1) over the visual tokens.

A *pruner* (a plain gather, no merge map): the kept tokens are real tokens in original order. The greedy loops
(max-sum in :func:`max_sum_greedy`, max–min in ``ops.farthest_point``) are ``k`` sequential steps. Where a sample's
``N × N`` matrix fits ``reference.GRAM_MAX_ELEMENTS`` (N ≤ 4096), the cosine Gram matrix is computed once (one GEMM)
and each step is a row lookup, ``O(B·N)``; above it each step is one ``[N, D] × [D]`` product, ``O(B·N·D)``, and no
``N × N`` matrix is built. Same picks either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc, acc_dtype
from vtok.pruners.registry import register
from vtok.selection import Selection

_TODRE_VERSIONS = ("v2", "v1")
_TODRE_STARTS = ("auto", "cls", "relevance", "central")


def task_relevance(tokens: Tensor, ctx: Context) -> Tensor | None:
    """``[B, N]`` relevance of each visual token to the task, or ``None`` when ``ctx`` has neither source.

    ``text_attn`` (``[B, N]``, ``[B, T, N]`` or ``[B, H, T, N]``) is averaged over heads and text queries;
    otherwise ``query`` (``[B, D]`` or ``[B, Q, D]``) gives the mean cosine similarity of each token to the
    query embeddings.
    """
    attn = ctx.get("text_attn")
    if attn is not None:
        a = acc(attn)
        while a.dim() > 2:
            a = a.mean(1)
        return a
    query = ctx.get("query")
    if query is not None:
        q = query if query.dim() == 3 else query[:, None]
        xn = F.normalize(acc(tokens), dim=-1)
        qn = F.normalize(acc(q).to(xn.dtype), dim=-1)
        return torch.einsum("bnd,bqd->bn", xn, qn) / q.shape[1]
    return None


def _cls_scores(cls_attn: Tensor) -> Tensor:
    """``cls_attn`` ``[B, N]`` or per head ``[B, H, N]`` → ``[B, N]`` (head mean), in the accumulation dtype."""
    a = cls_attn.to(acc_dtype(cls_attn))
    return a.mean(1) if a.dim() == 3 else a


def _central_token(tokens: Tensor) -> Tensor:
    """``[B]`` index of the most representative token: the largest ``x̂_i · mean_j x̂_j`` (cosine to the mean
    normalised feature), ``O(N·D)``; ties → lowest index."""
    xn = F.normalize(tokens.to(acc_dtype(tokens)), dim=-1)
    return (xn * xn.mean(1, keepdim=True)).sum(-1).argmax(1)


def max_sum_greedy(tokens: Tensor, k: int, start: Tensor) -> Tensor:
    """Greedy max-sum diversification (ToDRE v2, Algorithm 1) over ``tokens [B, N, D]``: ``[B, k]`` in pick order.

    ``C = {start}``; ``S_v = cos(x_v, x_start)``; then ``k − 1`` times: take ``c = argmin_{v ∉ C} S_v`` (the token
    with the smallest *cumulative* cosine similarity to the chosen set, i.e. the largest sum of cosine distances),
    add it and update ``S_v += cos(x_v, x_c)`` (Eqs. 4–6). Ties → lowest index (``argmin`` returns the first).
    Features are normalised once; fp16 / bf16 accumulate in fp32, fp32 / fp64 in their own dtype. Where the samples'
    ``N × N`` matrices fit ``reference.GRAM_MAX_ELEMENTS``, the cosine similarities come from one GEMM per group of
    samples and each step adds a row (``reference.greedy_max_sum``); otherwise each step is one ``[N, D] × [D]``
    product per sample: ``O(k·B·N·D)`` time, ``O(B·N)`` memory beyond the normalised copy. Same picks either way.
    """
    b, n, _ = tokens.shape
    rows = torch.arange(b, device=tokens.device)
    xn = F.normalize(tokens.to(acc_dtype(tokens)), dim=-1)
    groups = ref.gram_groups(b, n)
    if groups is not None:
        return torch.cat([ref.greedy_max_sum(xn[g] @ xn[g].transpose(1, 2), k, start[g]) for g in groups])

    def sim_to(c: Tensor) -> Tensor:  # [B] token index → [B, N] cosine similarities
        return torch.bmm(xn, xn[rows, c][:, :, None])[..., 0]

    sel = torch.empty(b, k, dtype=torch.long, device=tokens.device)
    sel[:, 0] = start
    cum = sim_to(start)
    cum[rows, start] = float("inf")  # chosen tokens stay masked: inf + finite = inf
    for t in range(1, k):
        c = cum.argmin(1)
        sel[:, t] = c
        cum += sim_to(c)
        cum[rows, c] = float("inf")
    return sel


@register("todre", family="diversity", uses=("cls_attn", "text_attn", "query"),
          paper="ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance (arXiv 2505.18757 v2; "
                "v1: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models)")
def todre(tokens: Tensor, k: int, ctx: Context, *, version: str = "v2", start: str = "auto",
          candidates: float = 1.0) -> Selection:
    """ToDRE's pre-LLM stage: greedy max-sum diversification (v2, default) or greedy k-center (v1) over ``tokens``.

    ToDRE has two versions of its first, "diversity-driven token selection" stage (arXiv 2505.18757); no public
    code of the authors was found, so both follow the paper text:

    * ``version="v2"`` (default; the current paper, Sec. 4.1 and Appendix Algorithm 1): the pivot is the token with
      the highest attention from the vision encoder's [CLS] token (Eq. 3; ``cls_attn``, head-averaged, argmax over
      all ``N`` tokens, which is also the video rule: per-frame maxima, then the best of them). Then greedy
      max-sum diversification: repeatedly add the token with the smallest cumulative cosine similarity to the
      chosen set (Eqs. 4–6; :func:`max_sum_greedy`).
    * ``version="v1"`` (the first arXiv version, May 2025, whose diversity stage is a "greedy k-center
      algorithm"): farthest point with cosine distance ``1 − cos`` (``ops.farthest_point``); the first center as
      vtok chose it before v2 was implemented (``start``).

    ToDRE's second stage — dropping *all* visual tokens at a late LLM layer (v2: ``7L/8``) once text↔visual
    attention falls below ``τ = 0.1`` ("information migration", Sec. 4.2) — needs the LLM's attention and belongs
    to an in-LLM hook, not here. ``k`` is vtok's budget (the paper keeps e.g. 288 of 2880 tokens). Ties → lowest
    index throughout; fp16 / bf16 accumulate in fp32, float64 stays float64.

    Options:
        version: ``"v2"`` (default) or ``"v1"``, as above.
        start: the first token. ``"cls"``: the highest ``cls_attn`` (needs ``cls_attn``); ``"relevance"``: the
            token most relevant to the task (``text_attn`` averaged over heads / text queries, else mean cosine
            similarity to ``query``); ``"central"``: the most representative token, the highest cosine to the mean
            normalised feature (``x̂_i · mean_j x̂_j``; vtok's reading of the paper's "Center" pivot, Appendix
            Table 1). ``"auto"`` (default): v2 → ``"cls"`` when ``cls_attn`` is given, else ``"central"`` (the
            paper allows a non-[CLS] pivot for encoders without one and reports Center within 0.1–0.4 points of
            [CLS]); v1 → ``"relevance"`` when ``text_attn`` or ``query`` is given, else ``"central"`` (vtok's
            earlier ``todre``).
        candidates: ``>= 1``, a vtok extension, not in either paper version. The greedy first picks
            ``min(N, ceil(candidates · k))`` diverse candidates; with a relevance signal (``text_attn`` / ``query``)
            the ``k`` most relevant of them are kept. ``1.0`` (default): the paper's pure diversity selection.
            Both greedy orders are prefix-consistent, so without a relevance signal any value equals ``1.0``.

    Returns a plain-gather ``Selection``, ``keep [B, k]`` ascending.
    """
    if version not in _TODRE_VERSIONS:
        raise ValueError(f"version must be one of {_TODRE_VERSIONS}, got {version!r}")
    if start not in _TODRE_STARTS:
        raise ValueError(f"start must be one of {_TODRE_STARTS}, got {start!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, float)) or not candidates >= 1.0:
        raise ValueError(f"candidates must be a number >= 1.0, got {candidates!r}")
    b, n, _ = tokens.shape
    relevance = task_relevance(tokens, ctx)
    cls_attn = ctx.get("cls_attn")
    if start == "relevance" and relevance is None:
        raise ValueError("start='relevance' needs context 'text_attn' or 'query'")
    if start == "cls" and cls_attn is None:
        raise ValueError("start='cls' needs context 'cls_attn' (attention each token receives from [CLS], [B, N] "
                         "or [B, H, N])")
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    if start == "auto":
        if version == "v2":
            start = "cls" if cls_attn is not None else "central"
        else:
            start = "relevance" if relevance is not None else "central"
    if start == "cls":
        first = _cls_scores(cls_attn).argmax(1)
    elif start == "relevance":
        first = relevance.argmax(1)
    else:
        first = _central_token(tokens)
    m = max(k, min(n, math.ceil(candidates * k - 1e-9)))
    if version == "v2":
        picks = max_sum_greedy(tokens, m, first)
    else:
        picks = ops.farthest_point(tokens, m, start=first, metric="cosine")
    if m > k and relevance is not None:
        chosen = ops.stable_topk(relevance.gather(1, picks), k)  # positions within picks
        picks = picks.gather(1, chosen)
    else:
        picks = picks[:, :k]
    return Selection.from_indices(picks, n)
