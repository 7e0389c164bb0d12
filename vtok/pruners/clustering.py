"""Clustering / merging strategies: k-means, k-medoids (CenterCLIP), DPC-kNN (ToMe lives in ``tome.py``).

Merging strategies return a ``Selection`` with ``assign`` (every token → its output slot) so ``apply`` averages
each group (size-weighted when ``compress`` passes ``sizes``); ``keep`` is one real token per slot, in ascending
order, giving the output token its position. k-medoids keeps the medoids themselves (a plain gather).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc, upcast_half
from vtok.pruners._checks import check_int
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


def _slot_sizes(assign: Tensor, k: int, sizes: Tensor | None) -> Tensor:
    """``[B, k]``: sum of the incoming ``sizes`` (or counts) of the tokens assigned to each slot (fp32; fp64 for fp64
    ``sizes``)."""
    w = torch.ones(assign.shape, device=assign.device) if sizes is None else acc(sizes)
    return torch.zeros(assign.shape[0], k, device=assign.device, dtype=w.dtype).scatter_add_(1, assign, w)


def _lowest_argmin_per_cluster(cost: Tensor, labels: Tensor, c: int) -> Tensor:
    """``[B, c]``: for each cluster, the member index with the smallest ``cost [B, N]`` (ties → lowest index)."""
    b, n = cost.shape
    cost = acc(cost)
    best = torch.full((b, c), float("inf"), device=cost.device, dtype=cost.dtype)
    best = best.scatter_reduce(1, labels, cost, "amin")
    idx = torch.arange(n, device=cost.device).expand(b, n)
    idx = torch.where(cost == best.gather(1, labels), idx, torch.full_like(idx, n))
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
    return _merge_selection(rep, labels, n, ctx.get("sizes"))


# ------------------------------------------------------------------------------------------------ k-medoids

_METRICS = ("cosine", "euclidean")
_INITS = ("kkz", "central")


def _nearest(x: Tensor, centers: Tensor, metric: str, chunk: int = 256) -> Tensor:
    """``[B, N]``: index of the nearest of ``centers [B, C, D]`` for each token (ties → lowest center index, i.e.
    the earliest in ``centers``' order), in the input's precision (fp64 stays fp64), chunked over tokens."""
    out = []
    for s in range(0, x.shape[1], chunk):
        out.append(ops.pairwise_distance_native(x[:, s:s + chunk], centers, metric).argmin(-1))
    return torch.cat(out, 1)


def _check_tol(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0.0:
        raise ValueError(f"tol must be a real number >= 0, got {value!r}")
    return float(value)


@register("kmedoids", family="clustering",
          paper="CenterCLIP: Token Clustering for Efficient Text-Video Retrieval (arXiv 2205.00823)")
def kmedoids(tokens: Tensor, k: int, ctx: Context, *, init: str = "kkz", metric: str = "euclidean",
             iters: int = 100, tol: float = 1e-6) -> Selection:
    """Keep ``k`` medoids of ``tokens [B, N, D]``: real tokens, one per cluster (CenterCLIP's center tokens).

    CenterCLIP (arXiv 2205.00823, Sec. 3.2) clusters the tokens of each temporal segment with k-medoids and keeps
    the *medoids* (real tokens, so positions stay meaningful) instead of averaged centroids: a plain gather
    ``Selection`` (no ``assign``). Segmenting a video into groups of frames is left to the caller (call per segment).

    The default reproduces the authors' code (github.com/mzhaoshuai/CenterCLIP, ``batch_fast_kmedoids`` in
    ``modules/cluster/fast_kmeans.py`` with the settings of their training scripts: ``cluster_distance=euclidean``,
    ``minkowski_norm_p=2``, ``cluster_threshold=1e-6``, ``cluster_iter_limit=100``, ``pre_norm=0``, no aggregation):

    1. KKZ init (Katsavounidis et al. 1994; their ``KKZ_init``): the token with the largest L2 norm, then
       repeatedly the token with the largest distance to its nearest chosen medoid (``ops.farthest_point``; ties →
       lowest index). Fully deterministic: their random k-medoids++ init (``kmeans_plusplus_init``) is unused.
    2. Voronoi iteration: every token joins its nearest medoid (ties → the medoid picked earlier, as their
       ``torch.min`` over the medoid list; a medoid always joins its own cluster, their ``self_nearest``), then each
       cluster's medoid becomes the member with the smallest sum of distances to the cluster's members (ties →
       lowest index; ``ops.cluster_medoids``). Cluster ``c`` keeps its slot ``c`` across iterations.
    3. Stop after the first update whose shift ``Σ_c ‖x[new_c] − x[old_c]‖₂ < tol`` (their ``center_shift``:
       Euclidean on the features whatever the metric), or after ``iters`` updates; the last update is kept.
    4. The kept tokens are the medoids in ascending index order (their ``id_sort=True``).

    Where vtok differs from that code: convergence is per sample (their batched code stops on the shift averaged
    over a chunk of ``split_size`` samples, so a sample's iteration count depended on its batch mates; vtok equals
    their code run one sample at a time); ``metric="cosine"`` is ``1 − cos`` of ``F.normalize``-d rows, theirs
    divides by ``‖x‖ + 1e-6``; distances are computed in the input's precision (fp64 stays fp64, half precision is
    upcast to fp32), so "ties → lowest index" holds exactly for fp64 input; their shifted, all-negative distance
    matrix is how they restrict the medoid update to members, vtok masks directly (same result).

    Options: ``init`` (``"kkz"``, default, as above | ``"central"``: vtok's earlier init, the most central token
    (smallest total distance to all tokens) then farthest-point, with slots kept in ascending index order, so
    assignment ties go to the lowest-index medoid), ``metric`` (``"euclidean"``, default, as CenterCLIP's scripts |
    ``"cosine"`` = 1 − cos), ``iters`` (int >= 1, most updates; default 100 = their ``cluster_iter_limit``), ``tol``
    (real >= 0, default 1e-6 = their ``cluster_threshold``; an update that leaves the medoids unchanged also stops).
    ``init="central", iters=10, tol=0`` is vtok's earlier ``kmedoids`` algorithm (its results differ only where the
    earlier code let the rounding noise of a token's fp32 distance to itself decide a medoid, and in fp64 precision).
    Memory ``O(B·chunk·N)`` (their code builds ``[B, K, N, N]``); compute ``O(N²·D)`` per iteration.
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    iters = check_int("iters", iters, 1)
    tol = _check_tol(tol)
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens)
    groups = None if ops.use_triton(x) else ref.gram_groups(b, n)
    if groups is not None:
        return Selection(torch.cat([_kmedoids_matrix(x[g], k, init, metric, iters, tol) for g in groups]), n)
    slots = torch.arange(k, device=x.device).expand(b, k)
    if init == "kkz":
        start = x.norm(dim=-1).argmax(1)  # largest L2 norm, ties → lowest index
        med = ops.farthest_point(x, k, start=start, metric=metric)  # slot c = c-th pick
    else:
        whole = torch.zeros(b, n, dtype=torch.long, device=x.device)
        central = ops.cluster_medoids(x, whole, 1, metric=metric)[:, 0]
        med = ops.farthest_point(x, k, start=central, metric=metric).sort(1).values
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        labels = _nearest(x, gather_tokens(x, med), metric)
        labels = labels.scatter(1, med, slots)  # a medoid always belongs to its own cluster (duplicates)
        new = ops.cluster_medoids(x, labels, k, metric=metric)
        if init == "central":
            new = new.sort(1).values
        shift = (gather_tokens(x, new) - gather_tokens(x, med)).pow(2).sum(-1).sqrt().sum(1)
        stop = (shift < tol) | (new == med).all(1)
        med = torch.where(done[:, None], med, new)  # a converged sample keeps its medoids
        done = done | stop
        if bool(done.all()):
            break
    return Selection(med.sort(1).values, n)


def _kmedoids_matrix(x: Tensor, k: int, init: str, metric: str, iters: int, tol: float) -> Tensor:
    """``kmedoids`` (the same steps) over one ``N × N`` distance matrix computed once (``reference.pairwise_matrix``,
    diagonal exactly 0 as ``cluster_medoids`` sets it): init and nearest-medoid lookups read its rows, every medoid
    update its row blocks. Returns the medoids ``[B, k]`` ascending."""
    b, n, _ = x.shape
    dev = x.device
    dist = ref.pairwise_matrix(x, metric)
    dist.diagonal(dim1=1, dim2=2).fill_(0.0)
    flat, base = dist.reshape(b * n, n), torch.arange(b, device=dev)[:, None] * n
    slots = torch.arange(k, device=dev).expand(b, k)
    if init == "kkz":
        med = ref.greedy_max_min(dist, k, x.norm(dim=-1).argmax(1))
    else:
        whole = torch.zeros(b, n, dtype=torch.long, device=dev)
        central = ref.cluster_medoids(x, whole, 1, metric=metric, dist=dist)[:, 0]
        med = ref.greedy_max_min(dist, k, central).sort(1).values
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    prev = cost = None
    for _ in range(iters):
        # nearest medoid of every token: argmin over the medoids' rows, ties → the earliest slot
        labels = flat.index_select(0, (base + med).view(-1)).view(b, k, n).argmin(1)
        labels = labels.scatter(1, med, slots)  # a medoid always belongs to its own cluster (duplicates)
        if init == "central":  # slots are renumbered every update: recompute every cost
            new = ref.cluster_medoids(x, labels, k, metric=metric, dist=dist).sort(1).values
        else:
            cost = _member_costs(dist, labels, prev, cost, k)
            new = _cluster_argmin(cost, labels, k)
            prev = labels
        shift = (gather_tokens(x, new) - gather_tokens(x, med)).pow(2).sum(-1).sqrt().sum(1)
        stop = (shift < tol) | (new == med).all(1)
        med = torch.where(done[:, None], med, new)  # a converged sample keeps its medoids
        done = done | stop
        if bool(done.all()):
            break
    return med.sort(1).values


def _member_costs(dist: Tensor, labels: Tensor, prev: Tensor | None, cost: Tensor | None, k: int,
                  chunk: int = ref.DEFAULT_CHUNK) -> Tensor:
    """``[B, N]``: each token's summed distance to the members of its cluster, ``Σ_j dist[i, j]·[l_j = l_i]``, as
    ``reference.cluster_medoids`` sums it (row by row over the full row, in the matrix's precision). Given the
    previous ``labels`` and costs, only tokens whose cluster gained or lost a member are recomputed: the others have
    the same members, hence the same sums (the same per-row reduction, so the same bits)."""
    b, n, _ = dist.shape
    if prev is None:
        rows = [torch.arange(n, device=dist.device)] * b
        cost = torch.empty(b, n, device=dist.device, dtype=dist.dtype)
    else:
        moved = labels != prev
        changed = torch.zeros(b, k, dtype=torch.bool, device=dist.device)
        changed[moved.nonzero()[:, 0], labels[moved]] = True
        changed[moved.nonzero()[:, 0], prev[moved]] = True
        stale = changed.gather(1, labels)
        rows = [stale[i].nonzero()[:, 0] for i in range(b)]
        cost = cost.clone()
    for i in range(b):
        for s in range(0, rows[i].numel(), chunk):
            r = rows[i][s:s + chunk]
            same = labels[i, r, None] == labels[i, None, :]
            cost[i, r] = (dist[i].index_select(0, r) * same).sum(-1)
    return cost


def _cluster_argmin(cost: Tensor, labels: Tensor, c: int) -> Tensor:
    """``[B, c]``: per cluster the member with the smallest ``cost`` (ties → lowest index), as
    ``reference.cluster_medoids`` picks it."""
    b, n = cost.shape
    best = torch.full((b, c), float("inf"), device=cost.device, dtype=cost.dtype).scatter_reduce(1, labels, cost,
                                                                                                  "amin")
    is_best = cost == best.gather(1, labels)
    idx = torch.where(is_best, torch.arange(n, device=cost.device).expand(b, n), torch.full_like(labels, n))
    return torch.full((b, c), n, dtype=torch.long, device=cost.device).scatter_reduce(1, labels, idx, "amin")


# -------------------------------------------------------------------------------------------------- DPC-kNN


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
    labels = _nearest(x, gather_tokens(x, centres), "sqeuclidean")  # ties → the higher-scored centre
    labels = labels.scatter(1, centres, torch.arange(k, device=x.device).expand(b, k))
    if order == "position":
        return _merge_selection(centres, labels, n, ctx.get("sizes"))
    return Selection.from_emitted(centres, n, labels, _slot_sizes(labels, k, ctx.get("sizes")))
