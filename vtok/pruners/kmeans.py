"""k-means token merging (Lloyd's algorithm from seeded k-means++ centres); each output token is its cluster's
centroid.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc, upcast_half
from vtok.pruners._checks import check_int
from vtok.pruners._clustering import merge_selection
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


def _lowest_argmin_per_cluster(cost: Tensor, labels: Tensor, c: int) -> Tensor:
    """``[B, c]``: for each cluster, the member index with the smallest ``cost [B, N]`` (ties → lowest index)."""
    b, n = cost.shape
    cost = acc(cost)
    best = torch.full((b, c), float("inf"), device=cost.device, dtype=cost.dtype)
    best = best.scatter_reduce(1, labels, cost, "amin")
    idx = torch.arange(n, device=cost.device).expand(b, n)
    idx = torch.where(cost == best.gather(1, labels), idx, torch.full_like(idx, n))
    return torch.full((b, c), n, dtype=torch.long, device=cost.device).scatter_reduce(1, labels, idx, "amin")


def kmeans_pp_init(x: Tensor, k: int, seed: int) -> Tensor:
    """Seeded k-means++ (Arthur & Vassilvitskii 2007) over ``x [B, N, D]`` → ``k`` distinct indices ``[B, k]``.

    The random draws ``u_0 … u_{k−1} ~ U[0, 1)`` come from ``torch.Generator().manual_seed(seed)`` and are shared
    by every sample, so a sample's centres do not depend on the rest of the batch. First centre ``floor(u_0 N)``;
    centre ``t`` is drawn with probability ∝ ``D(x)²`` (squared distance to the nearest chosen centre) by inverse
    CDF at ``u_t``; if every remaining token coincides with a centre, the lowest unchosen index is taken.
    Single trial per centre (scikit-learn's default adds ``2 + log k`` greedy trials). Squared distances are those of
    ``ops.pairwise_distance`` (fp32). Where the samples' ``N × N`` matrices fit ``reference.GRAM_MAX_ELEMENTS`` they
    come from one GEMM per group of samples (``reference.pairwise_matrix``) and each draw looks a row up, memory
    ``O(B·N²)``; otherwise one ``[N, D] × [D]`` product per draw, memory ``O(B·N)``. Same centres either way.
    """
    b, n, _ = x.shape
    dev = x.device
    u = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dev)
    first = min(int(u[0].item() * n), n - 1)
    groups = ref.gram_groups(b, n)
    if groups is None:
        return _kmeans_pp_draws(x, k, u, first, None)
    if x.device.type == "cpu":
        return torch.cat([_kmeans_pp_draws_gram(x[g], k, u, first) for g in groups])
    return torch.cat([_kmeans_pp_draws(x[g], k, u, first, acc(ref.pairwise_matrix(x[g], "sqeuclidean")))
                      for g in groups])


def _kmeans_pp_draws_gram(x: Tensor, k: int, u: Tensor, first: int) -> Tensor:
    """``kmeans_pp_init``'s draws on the CPU from the symmetric Gram matrix (``reference.gram_matrix``, half a GEMM).

    The squared distances are formed once, in place over the Gram buffer, exactly as ``ops.pairwise_distance`` forms
    them (``(‖x‖² + ‖c‖²) − 2·x·c`` in fp32, clamped at 0), with the diagonal set to 0; then each of the ``k``
    dependent draws is a few NumPy calls on one row (~1 µs each instead of torch's ~5–10 µs dispatch): the same
    float64 steps as :func:`_kmeans_pp_draws` (exact cast, ``minimum``, sequential ``cumsum``, right-side binary
    search). A chosen centre's running distance is 0 through the zero diagonal, which is what the reference's mask
    gives it, so no mask is applied per draw."""
    x = upcast_half(x).detach()
    b, n, _ = x.shape
    d2all = ref.gram_matrix(x).numpy()  # [B, N, N] fp32, becomes the squared distances
    sq = (x * x).sum(-1).numpy()  # [B, N]
    for i in range(b):
        g = d2all[i]
        for s in range(0, n, ref.DEFAULT_CHUNK):
            blk = g[s:s + ref.DEFAULT_CHUNK]
            np.maximum((sq[i, s:s + ref.DEFAULT_CHUNK, None] + sq[i]) - 2 * blk, 0, out=blk)
        np.fill_diagonal(g, 0.0)
    uu = u.cpu().numpy()
    picks = np.empty((k, b), dtype=np.int64)
    picks[0] = first
    chosen = np.zeros((b, n), dtype=bool)
    chosen[:, first] = True
    d2 = d2all[:, first].astype(np.float64)  # [B, N]
    for t in range(1, k):
        if t > 1:
            np.minimum(d2, d2all[np.arange(b), picks[t - 1]], out=d2)
        cum = d2.cumsum(1)
        total = cum[:, -1]
        target = uu[t] * total
        if b == 1:
            pick = np.minimum(np.searchsorted(cum[0], target, side="right"), n - 1)
        else:
            pick = np.array([np.searchsorted(cum[i], target[i], side="right") for i in range(b)]).clip(max=n - 1)
        if not (total > 0).all():
            pick = np.where(total > 0, pick, (~chosen).argmax(1))
        picks[t] = pick
        chosen[np.arange(b), pick] = True
    return torch.from_numpy(picks.T.copy())


def _kmeans_pp_draws(x: Tensor, k: int, u: Tensor, first: int, d2_all: Tensor | None) -> Tensor:
    """The k-means++ draws of ``kmeans_pp_init``; ``d2_all [B, N, N]``: all squared distances (fp32), or ``None`` to
    compute each centre's with a matrix-vector product (the streaming path)."""
    b, n, _ = x.shape
    dev = x.device
    rows = torch.arange(b, device=dev)
    if d2_all is not None:
        flat, base = d2_all.reshape(b * n, n), rows * n
    picks = [torch.full((b,), first, dtype=torch.long, device=dev)]
    chosen = torch.zeros(b, n, dtype=torch.bool, device=dev)
    chosen[:, first] = True
    d2 = None
    for t in range(1, k):
        if d2_all is None:
            new = ops.pairwise_distance(x, gather_tokens(x, picks[-1][:, None]), "sqeuclidean")[..., 0]
        else:
            new = flat.index_select(0, base + picks[-1])
        d2 = new.double() if d2 is None else torch.minimum(d2, new.double())  # exact cast: same minimum
        cum = d2.masked_fill(chosen, 0.0).cumsum(1)
        total = cum[:, -1]
        pick = torch.searchsorted(cum, (u[t] * total)[:, None], right=True)[:, 0].clamp_max_(n - 1)
        if not bool((total > 0).all()):
            pick = torch.where(total > 0, pick, (~chosen).to(torch.uint8).argmax(1))
        picks.append(pick)
        chosen[rows, pick] = True
    return torch.stack(picks, 1)


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
    seed = check_int("seed", seed, 0)
    iters = check_int("iters", iters, 1)
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
    diff = gather_tokens(centers, labels).sub_(x)  # (c − x)² = (x − c)² exactly
    own = diff.mul_(diff).sum(-1)
    rep = _lowest_argmin_per_cluster(own, labels, k)
    return merge_selection(rep, labels, n, ctx.get("sizes"))
