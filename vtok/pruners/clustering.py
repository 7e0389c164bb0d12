"""Clustering / merging strategies: k-means, k-medoids (CenterCLIP), DPC-kNN (ToMe lives in ``tome.py``).

Merging strategies return a ``Selection`` with ``assign`` (every token → its output slot) so ``apply`` averages
each group (size-weighted when ``compress`` passes ``sizes``); ``keep`` is one real token per slot, in ascending
order, giving the output token its position. k-medoids keeps the medoids themselves (a plain gather).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import upcast_half
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _slot_sizes(assign: Tensor, k: int, sizes: Tensor | None) -> Tensor:
    """``[B, k]`` fp32: sum of the incoming ``sizes`` (or counts) of the tokens assigned to each slot."""
    w = torch.ones(assign.shape, device=assign.device) if sizes is None else sizes.float()
    return torch.zeros(assign.shape[0], k, device=assign.device).scatter_add_(1, assign, w)


def _lowest_argmin_per_cluster(cost: Tensor, labels: Tensor, c: int) -> Tensor:
    """``[B, c]``: for each cluster, the member index with the smallest ``cost [B, N]`` (ties → lowest index)."""
    b, n = cost.shape
    best = torch.full((b, c), float("inf"), device=cost.device).scatter_reduce(1, labels, cost.float(), "amin")
    idx = torch.arange(n, device=cost.device).expand(b, n)
    idx = torch.where(cost.float() == best.gather(1, labels), idx, torch.full_like(idx, n))
    return torch.full((b, c), n, dtype=torch.long, device=cost.device).scatter_reduce(1, labels, idx, "amin")


def _merge_selection(rep: Tensor, labels: Tensor, n: int, sizes: Tensor | None) -> Selection:
    """Selection from one representative token per cluster ``rep [B, c]`` (unique) and ``labels [B, N]``:
    slots are renumbered so that ``keep`` (the representatives) is ascending."""
    keep, order = rep.sort(1)
    slot_of_cluster = torch.empty_like(order).scatter_(1, order, torch.arange(rep.shape[1], device=rep.device)
                                                        .expand_as(order).contiguous())
    assign = slot_of_cluster.gather(1, labels)
    return Selection(keep, n, assign, _slot_sizes(assign, rep.shape[1], sizes))


# -------------------------------------------------------------------------------------------------- k-means


def kmeans_pp_init(x: Tensor, k: int, seed: int) -> Tensor:
    """Seeded k-means++ (Arthur & Vassilvitskii 2007) over ``x [B, N, D]`` → ``k`` distinct indices ``[B, k]``.

    The random draws ``u_0 … u_{k−1} ~ U[0, 1)`` come from ``torch.Generator().manual_seed(seed)`` and are shared
    by every sample, so a sample's centres do not depend on the rest of the batch. First centre ``floor(u_0 N)``;
    centre ``t`` is drawn with probability ∝ ``D(x)²`` (squared distance to the nearest chosen centre) by inverse
    CDF at ``u_t``; if every remaining token coincides with a centre, the lowest unchosen index is taken.
    Single trial per centre (scikit-learn's default adds ``2 + log k`` greedy trials). Memory ``O(B·N)``.
    """
    b, n, _ = x.shape
    dev = x.device
    u = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dev)
    rows = torch.arange(b, device=dev)
    sel = torch.empty(b, k, dtype=torch.long, device=dev)
    sel[:, 0] = min(int(u[0].item() * n), n - 1)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    chosen[rows, sel[:, 0]] = True
    d2 = None
    for t in range(1, k):
        c = gather_tokens(x, sel[:, t - 1:t])
        new = ops.pairwise_distance(x, c, "sqeuclidean")[..., 0]
        d2 = new if d2 is None else torch.minimum(d2, new)
        w = d2.double().masked_fill(chosen, 0.0)
        cum = w.cumsum(1)
        total = cum[:, -1]
        pick = torch.searchsorted(cum, (u[t] * total)[:, None], right=True)[:, 0].clamp_max(n - 1)
        fallback = (~chosen).to(torch.uint8).argmax(1)
        pick = torch.where(total > 0, pick, fallback)
        sel[:, t] = pick
        chosen[rows, pick] = True
    return sel


def _cluster_means(x: Tensor, labels: Tensor, c: int) -> Tensor:
    b, n, d = x.shape
    num = torch.zeros(b, c, d, device=x.device, dtype=x.dtype).scatter_add_(1, labels[..., None].expand(b, n, d), x)
    cnt = torch.zeros(b, c, device=x.device, dtype=x.dtype).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    return num / cnt.clamp_min(1)[..., None]


def _fill_empty(labels: Tensor, dist: Tensor, c: int) -> Tensor:
    """Give every empty cluster a member: the token farthest from its centre among clusters with > 1 member
    (ties → lowest index), one empty cluster at a time in index order. Only samples with an empty cluster loop."""
    counts = torch.zeros(labels.shape[0], c, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    bad = (counts == 0).any(1)
    if not bool(bad.any()):
        return labels
    labels = labels.clone()
    for i in bad.nonzero()[:, 0].tolist():
        lab, cnt, dst = labels[i], counts[i], dist[i].clone()
        for e in (cnt == 0).nonzero()[:, 0].tolist():
            movable = cnt[lab] > 1
            j = int(dst.masked_fill(~movable, float("-inf")).argmax())
            cnt[lab[j]] -= 1
            cnt[e] += 1
            lab[j] = e
            dst[j] = float("-inf")  # a fresh singleton: never moved again
    return labels


@register("kmeans", family="clustering", uses=("sizes",), merges=True,
          paper="k-means token clustering (Lloyd; k-means++ init), as used for token merging e.g. in CenterCLIP "
                "(arXiv 2205.00823)")
def kmeans(tokens: Tensor, k: int, ctx: Context, *, seed: int = 0, iters: int = 20) -> Selection:
    """Merge ``tokens [B, N, D]`` into ``k`` k-means clusters; each output token is its cluster's centroid.

    Lloyd's algorithm on squared Euclidean distance, started from seeded k-means++ centres
    (``kmeans_pp_init``), for at most ``iters`` iterations, stopping when the assignment no longer changes
    (scikit-learn's strict convergence). An empty cluster is re-seeded with the token farthest from its
    centre (``_fill_empty``). Clustering is unweighted; ``apply`` averages with ``sizes`` when ``compress``
    passes them (then the output is the size-weighted mean of the cluster).

    Options: ``seed`` (int, k-means++ draws), ``iters`` (int >= 1).

    Returns a merging ``Selection``: ``assign [B, N]`` maps each token to its cluster's slot; ``keep [B, k]`` holds
    for each cluster the member closest to its centroid (ties → lowest index), and slots are numbered so that
    ``keep`` is ascending; ``size`` = number (or total ``sizes``) of members.
    """
    seed = _check_int("seed", seed, 0)
    iters = _check_int("iters", iters, 1)
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens)
    init = kmeans_pp_init(x, k, seed)
    centers = gather_tokens(x, init)
    labels = None
    for _ in range(iters):
        new, dist = ops.kmeans_assign(x, centers)
        new = _fill_empty(new, dist, k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = _cluster_means(x, labels, k)
    own = ((x - gather_tokens(centers, labels)) ** 2).sum(-1)
    rep = _lowest_argmin_per_cluster(own, labels, k)
    return _merge_selection(rep, labels, n, ctx.get("sizes"))


# ------------------------------------------------------------------------------------------------ k-medoids

_METRICS = ("cosine", "euclidean")


def _nearest(x: Tensor, centers: Tensor, metric: str, chunk: int = 256) -> Tensor:
    """``[B, N]``: index of the nearest of ``centers [B, C, D]`` for each token (ties → lowest), chunked."""
    out = []
    for s in range(0, x.shape[1], chunk):
        out.append(ops.pairwise_distance(x[:, s:s + chunk], centers, metric).argmin(-1))
    return torch.cat(out, 1)


@register("kmedoids", family="clustering",
          paper="CenterCLIP: Token Clustering for Efficient Text-Video Retrieval (arXiv 2205.00823)")
def kmedoids(tokens: Tensor, k: int, ctx: Context, *, metric: str = "euclidean", iters: int = 10) -> Selection:
    """Keep ``k`` medoids of ``tokens [B, N, D]``: real tokens, one per cluster (CenterCLIP's center tokens).

    CenterCLIP (Sec. 3.2) clusters the tokens of a segment with k-medoids and keeps the *medoids* (real tokens,
    so the kept tokens stay on the data and positions stay meaningful) instead of averaged centroids, so this is a
    plain gather ``Selection`` (no ``assign``). Alternating k-medoids (Voronoi iteration): assign every token to its
    nearest medoid, then replace each medoid by the member with the smallest sum of distances to its cluster
    (``ops.cluster_medoids``), until the medoids stop changing or ``iters`` is reached.

    Deterministic init (no randomness, instead of CenterCLIP's k-medoids++ sampling): the most central token (the
    smallest total distance to all tokens), then greedy farthest-point (``ops.farthest_point``) for the rest.
    Segmenting a video into groups of frames is left to the caller (call per segment).

    Options: ``metric`` (``"euclidean"`` or ``"cosine"`` = 1 − cos), ``iters`` (int >= 1).
    Memory ``O(B·chunk·N)``; compute ``O(N²·D)`` per iteration (medoids need all within-cluster distances).
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    iters = _check_int("iters", iters, 1)
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens)
    slots = torch.arange(k, device=x.device).expand(b, k)
    central = ops.cluster_medoids(x, torch.zeros(b, n, dtype=torch.long, device=x.device), 1, metric=metric)[:, 0]
    med = ops.farthest_point(x, k, start=central, metric=metric).sort(1).values
    for _ in range(iters):
        labels = _nearest(x, gather_tokens(x, med), metric)
        labels = labels.scatter(1, med, slots)  # a medoid always belongs to its own cluster (duplicates)
        new = ops.cluster_medoids(x, labels, k, metric=metric).sort(1).values
        if torch.equal(new, med):
            break
        med = new
    return Selection(med, n)


# -------------------------------------------------------------------------------------------------- DPC-kNN


@register("dpc_knn", family="clustering", uses=("sizes",), merges=True,
          paper="Density peaks clustering with kNN density (DPC-kNN, Du et al. 2016) as used for token merging in "
                "TCFormer: Not All Tokens Are Equal (arXiv 2204.08680)")
def dpc_knn(tokens: Tensor, k: int, ctx: Context, *, knn: int = 5) -> Selection:
    """Merge ``tokens [B, N, D]`` into ``k`` density-peak clusters (DPC-kNN as in TCFormer's token clustering).

    With distances ``d(i, j) = ‖x_i − x_j‖ / √D`` (TCFormer's scaling): density
    ``ρ_i = exp(−mean_{j ∈ kNN(i)} d(i, j)²)`` over the ``knn`` nearest other tokens (DPC-kNN's definition;
    TCFormer's code counts the token itself among its ``knn``); ``δ_i`` = distance to the nearest denser token
    (density ties broken by index), the largest distance in the sample for the densest token; score ``ρ·δ``.
    The ``k`` top scores (ties → lowest index) are the cluster centres; every token joins its nearest centre
    (centres their own), and ``apply`` averages each cluster (size-weighted when ``sizes`` are passed).

    Options: ``knn`` (int >= 1, capped at ``N − 1``). Needs all pairwise distances: computed in two chunked
    passes (``ops.density_peaks``), ``O(N²·D)`` time but ``O(B·chunk·N)`` memory.

    Returns a merging ``Selection``: ``keep`` = the centres (ascending), ``assign`` each token's centre slot.
    """
    knn = _check_int("knn", knn, 1)
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens).float() / math.sqrt(d)
    rho, delta = ops.density_peaks(x, knn)
    centres = ops.stable_topk(rho * delta, k)  # ascending
    labels, _ = ops.kmeans_assign(x, gather_tokens(x, centres))
    labels = labels.scatter(1, centres, torch.arange(k, device=x.device).expand(b, k))
    return Selection(centres, n, labels, _slot_sizes(labels, k, ctx.get("sizes")))
