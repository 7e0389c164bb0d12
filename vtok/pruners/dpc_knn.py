"""DPC-kNN token merging (density peaks clustering with kNN density, as in TCFormer and Chat-UniVi)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import upcast_half
from vtok.pruners._checks import check_int
from vtok.pruners._clustering import merge_selection, nearest, slot_sizes
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


@register("dpc_knn", family="clustering", uses=("sizes",), merges=True,
          paper="Density peaks clustering with kNN density (DPC-kNN, Du et al. 2016) as used for token merging in "
                "TCFormer: Not All Tokens Are Equal (arXiv 2204.08680)")
def dpc_knn(tokens: Tensor, k: int, ctx: Context, *, knn: int = 5, include_self: bool = True,
            order: str = "score") -> Selection:
    """Merge ``tokens [B, N, D]`` into ``k`` density-peak clusters (DPC-kNN as in TCFormer's token clustering).

    TCFormer (arXiv 2204.08680, Sec. 3.2, CTM block, token clustering: local density Eq. 1, distance indicator
    Eq. 2) clusters tokens with a variant of DPC-kNN (Du et al. 2016) and averages each cluster. The default
    reproduces the authors' code, ``cluster_dpc_knn`` in TCFormer's ``tcformer_module/tcformer_utils.py``, reused
    unchanged by Chat-UniVi (``ChatUniVi/model/cluster.py``):

    - distances ``d(i, j) = ‖x_i − x_j‖ / √D`` (their ``cdist / C ** 0.5``);
    - density ``ρ_i = exp(−(1/k) Σ_{j ∈ kNN(i)} d(i, j)²)`` where ``kNN(i)`` are the ``k`` nearest tokens *counting
      i itself* (their ``torch.topk(dist, k, largest=False)`` over the whole row, whose smallest entry is the
      self-distance 0): ``knn=5`` averages 4 other tokens and the token itself over 5;
    - ``δ_i`` = distance to the nearest denser token; the densest token gets the largest distance in the sample
      (their ``dist_max``; Eq. 2 uses that token's own largest distance, which ranks it first all the same);
    - score ``ρ·δ``; the ``k`` top scores are the centres; every token joins its nearest centre, and each centre
      is forced into its own cluster; ``apply`` averages each cluster.

    vtok is deterministic where their code is not: they add ``rand·1e-6`` to ``ρ`` to break density ties; vtok
    breaks ties by index instead (equal ``ρ``: the lower index counts as denser; equal scores: the lower index is
    the centre; a token equidistant from two centres joins the higher-scored one, as their ``argmin`` over the
    centres in ``torch.topk`` order). The result equals theirs unless their noise decides a comparison, i.e. away
    from density / score ties within 1e-6. Other differences: ``keep`` is ascending (positions stay meaningful)
    where their ``merge_tokens`` emits clusters in descending score order; the cluster mean is unweighted
    (size-weighted when ``compress`` passes ``sizes``), as Chat-UniVi (unit weights), while TCFormer weights tokens
    by a learned importance score; distances are computed in the input's precision (fp64 stays fp64, half
    precision is upcast to fp32; Chat-UniVi computes in fp32).

    Options: ``knn`` (int >= 1, default 5 as TCFormer and Chat-UniVi's first CTM; capped at ``N``, or ``N − 1``
    without self), ``include_self`` (bool, default True = the authors' code; False = the DPC-kNN paper's reading
    and vtok's earlier behaviour: the mean over the ``knn`` nearest *other* tokens), ``order`` (``"score"``, default:
    clusters emitted in descending ``ρ·δ`` of their centres, as their ``merge_tokens`` emits them (``Selection.order``);
    ``"position"``: ascending centre position, vtok's earlier order). All pairwise distances are
    needed: two chunked passes (``ops.density_peaks``), ``O(N²·D)`` time but ``O(B·chunk·N)`` memory.

    Returns a merging ``Selection``: ``keep`` = the centres (ascending), ``assign`` each token's centre slot,
    ``order`` the emission order.
    """
    knn = check_int("knn", knn, 1)
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")
    if not isinstance(include_self, bool):
        raise ValueError(f"include_self must be a bool, got {include_self!r}")
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens) / math.sqrt(d)
    rho, delta = ops.density_peaks(x, knn, include_self=include_self)
    score = rho * delta
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]  # score order, ties → lower
    labels = nearest(x, gather_tokens(x, centres), "sqeuclidean")  # ties → the higher-scored centre
    labels = labels.scatter(1, centres, torch.arange(k, device=x.device).expand(b, k))
    if order == "position":
        return merge_selection(centres, labels, n, ctx.get("sizes"))
    return Selection.from_emitted(centres, n, labels, slot_sizes(labels, k, ctx.get("sizes")))
