"""The strategies as they were before the CPU speed-ups of issue #22, kept verbatim as explicit references.

``tests/pruners/test_speed_equivalence.py`` checks that the optimised implementations in ``vtok`` pick exactly what
these do. Copied from ``vtok/pruners/{diversity,clustering}.py``, ``vtok/kernels/reference.py`` and
``vtok/selection.py`` (``Selection.apply``, as the function :func:`apply`) at commit ``bc0b8a1``, only renamed;
helpers the speed-ups do not touch are imported. Streaming / chunked formulations throughout: one ``[N, D] × [D]``
product per greedy step, every pairwise pass recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.kernels.reference import pairwise_distance, pairwise_distance_native, stable_topk, upcast_half
from vtok.pruners.todre import _central_token, _cls_scores, task_relevance
from vtok.selection import Selection, gather_tokens

CHUNK = 256


# ------------------------------------------------------------------------------------------------- selection.py


def apply(sel: Selection, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
    """``Selection.apply`` as it was (expanded ``scatter_add_`` over ``[B, N, D]``)."""
    if sel.assign is None:
        return gather_tokens(tokens, sel.emitted_keep())
    b, n, d = tokens.shape
    a = sel.assign
    idx = a.clamp_min(0)
    acc = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
    num = torch.zeros(b, sel.k, d, device=tokens.device, dtype=acc)
    if sel.coef is not None:
        c = (sel.coef.to(acc) * (a >= 0))[..., None]
        return sel.emit(num.scatter_add_(1, idx[..., None].expand(b, n, d), tokens.to(acc) * c).to(tokens.dtype))
    w = torch.ones(b, n, device=tokens.device, dtype=torch.float32) if weights is None else weights.float()
    w = w * (a >= 0)
    num.scatter_add_(1, idx[..., None].expand(b, n, d), tokens.to(acc) * w[..., None].to(acc))
    den = torch.zeros(b, sel.k, device=tokens.device, dtype=acc).scatter_add_(1, idx, w.to(acc))
    return sel.emit((num / den.clamp_min(torch.finfo(acc).tiny)[..., None]).to(tokens.dtype))

# ----------------------------------------------------------------------------------------- kernels/reference.py


def nearest_neighbor_distance(x: Tensor, *, metric: str = "cosine", chunk: int = CHUNK) -> Tensor:
    b, n, _ = x.shape
    xa = upcast_half(x)
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=-1)
    sq = (xa * xa).sum(-1)
    out = []
    for s in range(0, n, chunk):
        dot = xa[:, s:s + chunk] @ xa.transpose(1, 2)
        if metric == "cosine":
            d = (1.0 - dot).float()
        else:
            d = (sq[:, s:s + chunk, None] + sq[:, None, :] - 2.0 * dot).clamp_min(0.0).float()
            d = d.sqrt() if metric == "euclidean" else d
        rows = torch.arange(s, min(s + chunk, n), device=x.device)
        d[:, torch.arange(rows.numel(), device=x.device), rows] = float("inf")
        out.append(d.min(-1).values)
    return torch.cat(out, 1)


def farthest_point(x: Tensor, k: int, *, start: Tensor | None = None, metric: str = "cosine") -> Tensor:
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    xa = upcast_half(x)
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=-1)
    else:
        sq = (xa * xa).sum(-1)

    def dist_to(c: Tensor) -> Tensor:
        dot = torch.bmm(xa, xa[rows, c][:, :, None])[..., 0]
        if metric == "cosine":
            return 1.0 - dot
        d2 = (sq + sq[rows, c][:, None] - 2.0 * dot).clamp_min(0.0)
        return d2.sqrt() if metric == "euclidean" else d2

    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=x.device)
    sel = torch.empty(b, k, dtype=torch.long, device=x.device)
    sel[:, 0] = start
    mind = dist_to(start)
    chosen = torch.zeros(b, n, dtype=torch.bool, device=x.device)
    chosen[rows, start] = True
    for t in range(1, k):
        nxt = mind.masked_fill(chosen, float("-inf")).argmax(1)
        sel[:, t] = nxt
        chosen[rows, nxt] = True
        mind = torch.minimum(mind, dist_to(nxt))
    return sel


def density_peaks(x: Tensor, knn: int, *, include_self: bool = True, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    b, n, _ = x.shape
    kk = min(int(knn), n) if include_self else min(int(knn), n - 1)
    others = kk - 1 if include_self else kk
    rho, rowmax = [], []
    for s in range(0, n, chunk):
        d2 = pairwise_distance_native(x[:, s:s + chunk], x, "sqeuclidean")
        rowmax.append(d2.max(-1).values)
        if others > 0:
            rows = torch.arange(s, min(s + chunk, n), device=x.device)
            d2[:, torch.arange(rows.numel(), device=x.device), rows] = float("inf")
            near = d2.topk(others, dim=-1, largest=False).values
            rho.append(torch.exp(-(near.sum(-1) / kk if include_self else near.mean(-1))))
        else:
            rho.append(torch.ones(b, d2.shape[1], device=x.device, dtype=d2.dtype))
    density = torch.cat(rho, 1)
    dmax = torch.cat(rowmax, 1).max(1).values.sqrt()
    idx = torch.arange(n, device=x.device)
    deltas = []
    for s in range(0, n, chunk):
        d = pairwise_distance_native(x[:, s:s + chunk], x, "euclidean")
        ri, rj = density[:, s:s + chunk, None], density[:, None, :]
        ii = idx[s:s + chunk][None, :, None]
        denser = (rj > ri) | ((rj == ri) & (idx[None, None, :] < ii))
        dl = d.masked_fill(~denser, float("inf")).min(-1).values
        deltas.append(torch.where(torch.isinf(dl), dmax[:, None].expand_as(dl), dl))
    return density, torch.cat(deltas, 1)


def cluster_medoids(x: Tensor, labels: Tensor, c: int, *, metric: str = "euclidean", chunk: int = CHUNK) -> Tensor:
    b, n, _ = x.shape
    x = upcast_half(x)
    cost = torch.empty(b, n, device=x.device, dtype=x.dtype)
    for s in range(0, n, chunk):
        d = pairwise_distance_native(x[:, s:s + chunk], x, metric)
        rows = torch.arange(s, min(s + chunk, n), device=x.device)
        d[:, torch.arange(rows.numel(), device=x.device), rows] = 0.0
        same = labels[:, s:s + chunk, None] == labels[:, None, :]
        cost[:, s:s + chunk] = (d * same).sum(-1)
    best = torch.full((b, c), float("inf"), device=x.device, dtype=cost.dtype).scatter_reduce(1, labels, cost, "amin")
    is_best = cost == best.gather(1, labels)
    idx = torch.where(is_best, torch.arange(n, device=x.device).expand(b, n), torch.full_like(labels, n))
    return torch.full((b, c), n, dtype=torch.long, device=x.device).scatter_reduce(1, labels, idx, "amin")


# ----------------------------------------------------------------------------------------- pruners/diversity.py


def divprune(tokens: Tensor, k: int, ctx) -> Selection:
    b, n, _ = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    start = nearest_neighbor_distance(tokens, metric="cosine").argmax(1)
    picks = farthest_point(tokens, k, start=start, metric="cosine")
    return Selection.from_indices(picks, n)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def max_sum_greedy(tokens: Tensor, k: int, start: Tensor) -> Tensor:
    b, n, _ = tokens.shape
    rows = torch.arange(b, device=tokens.device)
    xn = F.normalize(tokens.to(_acc_dtype(tokens)), dim=-1)

    def sim_to(c: Tensor) -> Tensor:
        return torch.bmm(xn, xn[rows, c][:, :, None])[..., 0]

    sel = torch.empty(b, k, dtype=torch.long, device=tokens.device)
    sel[:, 0] = start
    cum = sim_to(start)
    cum[rows, start] = float("inf")
    for t in range(1, k):
        c = cum.argmin(1)
        sel[:, t] = c
        cum += sim_to(c)
        cum[rows, c] = float("inf")
    return sel


def todre(tokens: Tensor, k: int, ctx, *, version: str = "v2", start: str = "auto",
          candidates: float = 1.0) -> Selection:
    b, n, _ = tokens.shape
    relevance = task_relevance(tokens, ctx)
    cls_attn = ctx.get("cls_attn")
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
        picks = farthest_point(tokens, m, start=first, metric="cosine")
    if m > k and relevance is not None:
        chosen = stable_topk(relevance.gather(1, picks), k)
        picks = picks.gather(1, chosen)
    else:
        picks = picks[:, :k]
    return Selection.from_indices(picks, n)


# ---------------------------------------------------------------------------------------- pruners/clustering.py


def kmeans_assign(x: Tensor, centroids: Tensor, *, chunk: int = CHUNK) -> tuple[Tensor, Tensor]:
    idxs, ds = [], []
    for s in range(0, x.shape[1], chunk):
        d = pairwise_distance(x[:, s:s + chunk], centroids, "sqeuclidean")
        v, i = d.min(-1)
        idxs.append(i)
        ds.append(v)
    return torch.cat(idxs, 1), torch.cat(ds, 1)


def _slot_sizes(assign: Tensor, k: int, sizes: Tensor | None) -> Tensor:
    w = torch.ones(assign.shape, device=assign.device) if sizes is None else sizes.float()
    return torch.zeros(assign.shape[0], k, device=assign.device).scatter_add_(1, assign, w)


def _lowest_argmin_per_cluster(cost: Tensor, labels: Tensor, c: int) -> Tensor:
    b, n = cost.shape
    best = torch.full((b, c), float("inf"), device=cost.device).scatter_reduce(1, labels, cost.float(), "amin")
    idx = torch.arange(n, device=cost.device).expand(b, n)
    idx = torch.where(cost.float() == best.gather(1, labels), idx, torch.full_like(idx, n))
    return torch.full((b, c), n, dtype=torch.long, device=cost.device).scatter_reduce(1, labels, idx, "amin")


def _merge_selection(rep: Tensor, labels: Tensor, n: int, sizes: Tensor | None) -> Selection:
    keep, order = rep.sort(1)
    slot_of_cluster = torch.empty_like(order).scatter_(1, order, torch.arange(rep.shape[1], device=rep.device)
                                                        .expand_as(order).contiguous())
    assign = slot_of_cluster.gather(1, labels)
    return Selection(keep, n, assign, _slot_sizes(assign, rep.shape[1], sizes))


def _cluster_means(x: Tensor, labels: Tensor, c: int) -> Tensor:
    b, n, d = x.shape
    num = torch.zeros(b, c, d, device=x.device, dtype=x.dtype).scatter_add_(1, labels[..., None].expand(b, n, d), x)
    cnt = torch.zeros(b, c, device=x.device, dtype=x.dtype).scatter_add_(1, labels, torch.ones_like(x[..., 0]))
    return num / cnt.clamp_min(1)[..., None]


def _fill_empty(labels: Tensor, dist: Tensor, c: int) -> Tensor:
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
            dst[j] = float("-inf")
    return labels


def kmeans_pp_init(x: Tensor, k: int, seed: int) -> Tensor:
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
        new = pairwise_distance(x, c, "sqeuclidean")[..., 0]
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


def kmeans(tokens: Tensor, k: int, ctx, *, seed: int = 0, iters: int = 20) -> Selection:
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens)
    init = kmeans_pp_init(x, k, seed)
    centers = gather_tokens(x, init)
    labels = None
    for _ in range(iters):
        new, dist = kmeans_assign(x, centers)
        new = _fill_empty(new, dist, k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = _cluster_means(x, labels, k)
    own = ((x - gather_tokens(centers, labels)) ** 2).sum(-1)
    rep = _lowest_argmin_per_cluster(own, labels, k)
    return _merge_selection(rep, labels, n, ctx.get("sizes"))


def _nearest(x: Tensor, centers: Tensor, metric: str, chunk: int = CHUNK) -> Tensor:
    out = []
    for s in range(0, x.shape[1], chunk):
        out.append(pairwise_distance_native(x[:, s:s + chunk], centers, metric).argmin(-1))
    return torch.cat(out, 1)


def kmedoids(tokens: Tensor, k: int, ctx, *, init: str = "kkz", metric: str = "euclidean", iters: int = 100,
             tol: float = 1e-6) -> Selection:
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens)
    slots = torch.arange(k, device=x.device).expand(b, k)
    if init == "kkz":
        start = x.norm(dim=-1).argmax(1)
        med = farthest_point(x, k, start=start, metric=metric)
    else:
        whole = torch.zeros(b, n, dtype=torch.long, device=x.device)
        central = cluster_medoids(x, whole, 1, metric=metric)[:, 0]
        med = farthest_point(x, k, start=central, metric=metric).sort(1).values
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    for _ in range(iters):
        labels = _nearest(x, gather_tokens(x, med), metric)
        labels = labels.scatter(1, med, slots)
        new = cluster_medoids(x, labels, k, metric=metric)
        if init == "central":
            new = new.sort(1).values
        shift = (gather_tokens(x, new) - gather_tokens(x, med)).pow(2).sum(-1).sqrt().sum(1)
        stop = (shift < tol) | (new == med).all(1)
        med = torch.where(done[:, None], med, new)
        done = done | stop
        if bool(done.all()):
            break
    return Selection(med.sort(1).values, n)


def dpc_knn(tokens: Tensor, k: int, ctx, *, knn: int = 5, include_self: bool = True,
            order: str = "score") -> Selection:
    b, n, d = tokens.shape
    if k >= n:
        return Selection.identity(b, n, tokens.device)
    x = upcast_half(tokens) / math.sqrt(d)
    rho, delta = density_peaks(x, knn, include_self=include_self)
    score = rho * delta
    centres = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    labels = _nearest(x, gather_tokens(x, centres), "sqeuclidean")
    labels = labels.scatter(1, centres, torch.arange(k, device=x.device).expand(b, k))
    if order == "position":
        return _merge_selection(centres, labels, n, ctx.get("sizes"))
    return Selection.from_emitted(centres, n, labels, _slot_sizes(labels, k, ctx.get("sizes")))


REFERENCES = {"divprune": divprune, "todre": todre, "kmeans": kmeans, "kmedoids": kmedoids, "dpc_knn": dpc_knn}
