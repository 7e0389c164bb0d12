"""k-medoids (CenterCLIP, arXiv 2205.00823): keep one real token per cluster, its medoid (a plain gather)."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref
from vtok.kernels.reference import upcast_half
from vtok.pruners._checks import check_int
from vtok.pruners._clustering import nearest
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens

_METRICS = ("cosine", "euclidean")
_INITS = ("kkz", "central")


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
        labels = nearest(x, gather_tokens(x, med), metric)
        labels = labels.scatter(1, med, slots)  # a medoid always belongs to its own cluster (duplicates)
        new = ops.cluster_medoids(x, labels, k, metric=metric)
        if init == "central":
            new = new.sort(1).values
        med, done = _update(x, med, new, done, tol)
        if bool(done.all()):
            break
    return Selection(med.sort(1).values, n)


def _update(x: Tensor, med: Tensor, new: Tensor, done: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """One medoid update ``med → new`` (``[B, k]``) for the samples not yet converged (``done [B]``): a sample stops
    when its medoids move less than ``tol`` in total (Euclidean, on ``x [B, N, D]``) or not at all."""
    shift = (gather_tokens(x, new) - gather_tokens(x, med)).pow(2).sum(-1).sqrt().sum(1)
    stop = (shift < tol) | (new == med).all(1)
    return torch.where(done[:, None], med, new), done | stop  # a converged sample keeps its medoids


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
        med, done = _update(x, med, new, done, tol)
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
