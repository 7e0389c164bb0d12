"""Determinantal-point-process selection: CDPruner (conditional DPP, greedy MAP inference).

A DPP with kernel ``L [N, N]`` scores a subset ``S`` by ``det(L_S)``: large when the chosen tokens are both
individually strong (``L_ii``) and mutually dissimilar. The greedy MAP inference of Chen et al. 2018 ("Fast Greedy
MAP Inference for Determinantal Point Process to Improve Recommendation Diversity", Algorithm 1) adds, ``k``
times, the token with the largest marginal gain ``d_i^2 = det(L_{S+i}) / det(L_S)``, updating all gains with one
incremental Cholesky row per step: ``O(k^2 N)``, plus the kernel rows: read from the ``N × N`` cosine matrix, built
once with one GEMM while the batch's matrices fit ``reference.GRAM_MAX_ELEMENTS``, else computed on the fly
(``O(k N D)``, no ``N × N`` matrix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection

_SIGNS = ("auto", "negative", "positive")



def cdpruner_relevance(tokens: Tensor, query: Tensor | None, *, sign: str = "negative",
                       theta: float | None = None) -> Tensor:
    """``[B, N]`` CDPruner relevance of ``tokens [B, N, D]`` to ``query`` (``[B, D]`` / ``[B, Q, D]``), in ``(0, 1]``.

    ``tokens`` here are the representation relevance is measured in (``relevance_features`` where the method has
    them). ``s_i = ± mean_q cos(x_i, q)`` (``sign``), min–max normalised per sample to
    ``(s_i − min + 1e-6) / (max − min)`` (the authors' code; ``1`` everywhere when all scores are equal); with
    ``theta`` in ``[0, 1)`` the paper's optional sharpening ``exp(α · r)``, ``α = θ / (2 (1 − θ))``. Without a query
    every relevance is ``1``.
    """
    b, n = tokens.shape[:2]
    x = acc(tokens)
    if query is None:
        return torch.ones(b, n, dtype=x.dtype, device=x.device)
    q = query if query.dim() == 3 else query[:, None]
    s = torch.einsum("bnd,bqd->bn", F.normalize(x, dim=-1), F.normalize(q.to(x.dtype), dim=-1)) / q.shape[1]
    if sign == "negative":
        s = -s
    lo, hi = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    span = hi - lo
    r = torch.where(span > 0, (s - lo + 1e-6) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(s))
    if theta is not None:
        r = torch.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r


def dpp_greedy(xn: Tensor, relevance: Tensor, k: int) -> Tensor:
    """Greedy MAP of the DPP with kernel ``L = diag(r) · (xn xnᵀ) · diag(r)``: ``[B, k]`` picks in pick order.

    ``xn [B, N, D]``: L2-normalised features (similarity = cosine); ``relevance`` ``r [B, N]``. Chen et al. 2018,
    Algorithm 1: gains ``d² = diag(L)``; each step takes ``j = argmax d²`` (ties → lowest index), computes the
    Cholesky row ``e = (L_j − Σ_t c_t[j] c_t) / sqrt(d²_j)`` and updates ``d² −= e²``. Once the best remaining
    gain is numerically zero (``k`` exceeds the kernel's rank, e.g. ``k > D``), the remaining slots go to the most
    relevant unpicked tokens (the authors' code has no guard there: ``sqrt`` of a non-positive gain).
    """
    b, n, _ = xn.shape
    dev, dt = xn.device, xn.dtype
    rows = torch.arange(b, device=dev)
    chol = torch.zeros(b, k, n, dtype=dt, device=dev)
    gain = relevance * relevance  # diag(L): cos(x_i, x_i) = 1
    tol = gain.amax(1) * (torch.finfo(dt).eps * 64)  # [B]
    picked = torch.zeros(b, n, dtype=torch.bool, device=dev)
    out = torch.empty(b, k, dtype=torch.long, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    groups = ref.gram_groups(b, n)
    # the cosine matrix once (one GEMM) where the batch's N x N matrices fit, instead of one [N, D] x [D] product per
    # step (~3x less time at N = 2880, k = 720; the rows agree with the products to the last bit or two)
    gram = torch.bmm(xn, xn.transpose(1, 2)) if groups is not None and len(groups) == 1 else None
    for t in range(k):
        g = torch.where(picked, neg_inf, gain)
        best, j = g.max(1)
        spent = best <= tol  # [B] rank exhausted: fall back to relevance
        j = torch.where(spent, torch.where(picked, neg_inf, relevance).argmax(1), j)
        out[:, t] = j
        picked[rows, j] = True
        if bool(spent.all()):
            continue
        sim_j = gram[rows, j] if gram is not None else torch.bmm(xn, xn[rows, j][:, :, None])[..., 0]  # cos(x_i, x_j)
        l_j = relevance[rows, j][:, None] * sim_j * relevance  # kernel row L_j
        if t:
            l_j = l_j - torch.bmm(chol[rows, :t, j][:, None, :], chol[:, :t])[:, 0]
        e = l_j / best.clamp_min(torch.finfo(dt).tiny).sqrt()[:, None]
        e = torch.where(spent[:, None], torch.zeros_like(e), e)
        chol[:, t] = e
        gain = gain - e * e
    return out


@register("cdpruner", family="diversity", uses=("query", "relevance_features"),
          placement=Placement(layer=-2, at="output", prop_attn=False),
          paper="CDPruner: Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in "
                "MLLMs (arXiv 2506.10967)")
def cdpruner_select(tokens: Tensor, k: int, ctx: Context, *, relevance_sign: str = "auto",
                    theta: float | None = None) -> Selection:
    """CDPruner: the ``k`` tokens of the greedy MAP of a DPP conditioned on the instruction (exact ``k``).

    Paper Sec. 3: conditional similarity ``L = diag(r) · S · diag(r)`` with ``S`` the cosine similarity of the
    visual tokens ``[B, N, D]`` and ``r`` their relevance to the instruction; the kept set maximises ``det(L_S)``,
    approximated by greedy MAP inference (Chen et al. 2018, :func:`dpp_greedy`). Without ``query`` every
    ``r_i = 1`` (a plain, unconditional DPP over similarity).

    The authors' code (``encode_images``) uses two representations of the same tokens, and so does this method:

    * ``S`` from ``tokens``: in their LLaVA the projector's output ``mm_projector(h)`` (the LLM's width), the tokens
      the LLM receives.
    * ``r`` (:func:`cdpruner_relevance`) from ``relevance_features [B, N, Dq]`` against ``query`` (``[B, Dq]`` or
      ``[B, Q, Dq]``): in their LLaVA CLIP's image embeddings ``visual_projection(post_layernorm(h))`` of the
      layer −2 patch features ``h`` against the CLIP text embeddings of the question (one per 77-token segment,
      their cosines averaged). Without ``relevance_features`` relevance is measured on ``tokens``, and ``query``
      must be in their space. ``vtok.compress(projected, "cdpruner", k, relevance_features=clip_image_embeds,
      query=clip_text_embeds)`` is their computation.

    Where the authors' code differs from the paper text, vtok follows the code:

    * ``relevance_sign``: the code uses the *negated* mean cosine similarity (``(-relevance).mean``), which the
      authors report as a property of CLIP's patch vs text embeddings, seen only in CLIP (their issues #9, #14).
      ``"auto"`` (default): ``"negative"`` (the code) where ``relevance_features`` is given (the authors' two
      representations), ``"positive"`` (the paper's plain cosine) where ``tokens`` and ``query`` share one space —
      e.g. ``vtok.wrap``'s projected features against the language model's text embeddings, its substitute on
      models without a CLIP text tower. ``"negative"`` / ``"positive"`` force either.
    * min–max normalisation ``(s − min + 1e-6) / (max − min)`` is per sample here (the code normalises over the
      whole batch, which couples samples; their LLaVA-1.5 runs one image per batch, so per sample is theirs).
    * ``theta`` (``None`` = off, the code's default): the optional relevance sharpening ``exp(α r)``,
      ``α = θ / (2 (1 − θ))``, ``θ`` in ``[0, 1)``, commented out in the code.

    Returns a plain-gather ``Selection``, ``keep [B, k]`` ascending.
    """
    b, n = tokens.shape[:2]
    if relevance_sign not in _SIGNS:
        raise ValueError(f"relevance_sign must be one of {list(_SIGNS)}, got {relevance_sign!r}")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                              or not 0.0 <= float(theta) < 1.0):
        raise ValueError(f"theta must be None or a number in [0, 1), got {theta!r}")
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    rel_x = ctx.get("relevance_features")
    sign = relevance_sign if relevance_sign != "auto" else ("negative" if rel_x is not None else "positive")
    r = cdpruner_relevance(tokens if rel_x is None else rel_x, ctx.get("query"), sign=sign,
                           theta=None if theta is None else float(theta))
    xn = F.normalize(acc(tokens), dim=-1)
    return Selection.from_indices(dpp_greedy(xn, r.to(xn.dtype), k), n)
