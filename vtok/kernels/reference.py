"""Pure-PyTorch reference reductions: the CPU path and the oracle for the fused kernels.

All are chunked so that no ``N × N`` matrix is materialised where the method does not need one: peak extra memory
is ``O(chunk · N)`` per batch-head. The exception is the greedy / iterative diversity and clustering reductions
(``farthest_point``, ``max_min_diverse``, ``density_peaks``, and the strategies built on ``pairwise_matrix``): they
read the same pairwise distances many times, so below :data:`GRAM_MAX_ELEMENTS` they compute all of them once (one
GEMM, chunked over rows) and look rows up; above it they stream exactly as before, with the same picks. Shapes:
``B`` batch, ``H`` heads, ``N`` keys/tokens, ``M`` query rows, ``D`` features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from vtok.selection import gather_tokens

DEFAULT_CHUNK = 256

GRAM_MAX_ELEMENTS = 1 << 24
"""Most entries ``g · N · N`` of the pairwise matrix built at once for ``g`` samples of a batch: 2**24 (64 MiB in fp32,
128 MiB in fp64), i.e. one sample up to ``N = 4096`` tokens (LLaVA-NeXT's 2880 in groups of 2). Samples are processed
in groups that fit; when a single sample does not (video, e.g. 64 frames × 196 = 12.5k tokens: 600 MiB) the
streaming / chunked path runs instead: ``O(B·chunk·N)`` memory, the same picks, several times slower. Read at call
time, so it can be changed (tests lower it to exercise the streaming path)."""


def upcast_half(x: Tensor) -> Tensor:
    """Upcast half precision (fp16 / bf16) to fp32 for accumulation; other dtypes pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype scores and distances are computed in: float64 stays float64 (ties then resolve on the exact
    values), everything else (fp32, fp16, bf16, integers) computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acc(x: Tensor) -> Tensor:
    """``x`` in :func:`acc_dtype` (a no-op for fp32 and fp64)."""
    return x.to(acc_dtype(x))


def attention_rows(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                   q_pos: Tensor | None = None, k_pos: Tensor | None = None) -> Tensor:
    """Softmax attention rows for a few queries: ``q [B, H, M, dh]``, ``k [B, H, N, dh]`` → ``[B, H, M, N]``
    (fp32; fp64 for fp64 input).

    ``key_mask [B, N]`` (True = may be attended) and causal positions ``q_pos [M]`` / ``k_pos [N]`` (a key is
    visible when ``k_pos <= q_pos``) are optional. Use for small ``M`` (CLS row, last token, instructions).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("bhmd,bhnd->bhmn", upcast_half(q), upcast_half(k)) * scale
    logits = _mask_logits(logits, key_mask, q_pos, k_pos)
    return torch.softmax(logits, dim=-1)


def _mask_logits(logits: Tensor, key_mask: Tensor | None, q_pos: Tensor | None, k_pos: Tensor | None) -> Tensor:
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    if q_pos is not None and k_pos is not None:
        visible = k_pos[None, :] <= q_pos[:, None]  # [M, N]
        logits = logits.masked_fill(~visible, float("-inf"))
    return logits


def attention_received(q: Tensor, k: Tensor, *, scale: float | None = None, key_mask: Tensor | None = None,
                       q_pos: Tensor | None = None, k_pos: Tensor | None = None, head_mean: bool = True,
                       chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Attention each key receives, summed over the query rows: ``Σ_m softmax(q_m kᵀ · scale)``.

    ``q [B, H, M, dh]``, ``k [B, H, N, dh]`` → ``[B, N]`` (mean over heads) or ``[B, H, N]``; fp32 (fp64 for fp64
    input). Queries are processed ``chunk`` rows at a time, so peak memory is ``O(B·H·chunk·N)``, never ``M × N``.
    Fully masked rows (a query that sees no key) contribute zero.
    """
    b, h, m, _ = q.shape
    n = k.shape[2]
    out = torch.zeros(b, h, n, device=q.device, dtype=acc_dtype(q))
    for s in range(0, m, chunk):
        qp = q_pos[s:s + chunk] if q_pos is not None else None
        p = attention_rows(q[:, :, s:s + chunk], k, scale=scale, key_mask=key_mask, q_pos=qp, k_pos=k_pos)
        out += torch.nan_to_num(p, nan=0.0).sum(2)
    return out.mean(1) if head_mean else out


def cosine_argmax(a: Tensor, b: Tensor, *, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """For each row of ``a [B, Na, D]``, its most cosine-similar row of ``b [B, Nb, D]``.

    Returns ``(best_sim [B, Na] fp32 (fp64 for fp64 input), best_idx [B, Na] long)``; ties go to the lowest index.
    Chunked over ``Na``.
    """
    an = torch.nn.functional.normalize(upcast_half(a), dim=-1)
    bn = torch.nn.functional.normalize(upcast_half(b), dim=-1)
    sims, idxs = [], []
    for s in range(0, an.shape[1], chunk):
        sim = an[:, s:s + chunk] @ bn.transpose(1, 2)
        v, i = sim.max(dim=-1)
        sims.append(v)
        idxs.append(i)
    return acc(torch.cat(sims, 1)), torch.cat(idxs, 1)


def pairwise_distance(a: Tensor, b: Tensor, metric: str = "cosine") -> Tensor:
    """Distances ``[B, Na, Nb]`` between rows of ``a [B, Na, D]`` and ``b [B, Nb, D]`` (fp32, fp64 for fp64 input;
    computed as ``pairwise_distance_native``, then cast).

    ``metric``: ``"cosine"`` (1 − cos), ``"euclidean"`` or ``"sqeuclidean"``.
    """
    return acc(pairwise_distance_native(a, b, metric))


def pairwise_distance_native(a: Tensor, b: Tensor, metric: str = "cosine") -> Tensor:
    """``pairwise_distance`` in the inputs' own precision: ``[B, Na, Nb]``, fp64 for fp64 input (fp32 for fp32 and,
    upcast, for half precision), so that argmin / argmax ties are ties of the exact values (the clustering
    strategies' "ties → lowest index" holds for fp64 input). ``metric``: ``"cosine"`` (1 − cos), ``"euclidean"`` or
    ``"sqeuclidean"``."""
    a, b = upcast_half(a), upcast_half(b)
    if metric == "cosine":
        an = torch.nn.functional.normalize(a, dim=-1)
        bn = torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - dots(an, bn)
    if metric in ("euclidean", "sqeuclidean"):
        d2 = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2.0 * dots(a, b)
        d2 = d2.clamp_min(0.0)
        return d2.sqrt() if metric == "euclidean" else d2
    raise ValueError(f"metric must be 'cosine', 'euclidean' or 'sqeuclidean', got {metric!r}")


DOTS_BLOCK = 1 << 22
"""Most elements of the ``[B, rows, Nb, D]`` product block :func:`dots` forms at once for fp64 (32 MiB)."""


def dots(a: Tensor, b: Tensor) -> Tensor:
    """Dot products ``[B, Na, Nb]`` of the rows of ``a [B, Na, D]`` and ``b [B, Nb, D]``.

    A GEMM, except in fp64: there each pair is summed on its own (elementwise products, one reduction per pair), so
    ``a_i · b_j`` is the same number whichever side a row is on and however the rows are chunked. A small fp64 GEMM
    need not round ``x_i · x_j`` and ``x_j · x_i`` alike (MKL's does not on AVX-512), and the ties the data make exact
    (``d(i, j) = d(j, i)`` of a mutual pair, a two-member cluster's costs) must resolve by the documented rule
    (lowest index), not by that rounding. ``O(Na·Nb·D)`` without a GEMM: fp64 is the exact path, not the fast one.
    """
    if a.dtype != torch.float64 or b.dtype != torch.float64:
        return a @ b.transpose(1, 2)
    bsz, na, d = a.shape
    rows = max(1, DOTS_BLOCK // max(1, bsz * b.shape[1] * d))
    return torch.cat([(a[:, s:s + rows, None, :] * b[:, None, :, :]).sum(-1) for s in range(0, na, rows)], 1)


def gram_groups(b: int, n: int) -> list[slice] | None:
    """Batch slices whose ``N × N`` pairwise matrices fit :data:`GRAM_MAX_ELEMENTS` together, or ``None`` when a
    single sample's does not (then the streaming path runs)."""
    per = GRAM_MAX_ELEMENTS // max(n * n, 1)
    if per < 1:
        return None
    return [slice(s, min(s + per, b)) for s in range(0, b, per)]


@torch.no_grad()
def pairwise_matrix(x: Tensor, metric: str = "cosine", *, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """All pairwise distances ``[B, N, N]`` of ``x [B, N, D]`` in the input's own precision (fp64 stays fp64, half
    precision is upcast to fp32): row block ``[s, s + chunk)`` holds exactly the values of
    ``pairwise_distance_native(x[:, s:s + chunk], x, metric)`` (the chunked passes of ``density_peaks`` /
    ``cluster_medoids`` compute the same numbers), with features normalised / squared norms taken once; fp64 is
    exactly symmetric (:func:`dots`). One GEMM in
    row blocks; memory ``B·N²`` plus one ``chunk × N`` block (callers check :func:`gram_groups` first). Carries no
    gradient (the distances only rank tokens), so inputs that require grad are fine."""
    if metric not in ("cosine", "euclidean", "sqeuclidean"):
        raise ValueError(f"metric must be 'cosine', 'euclidean' or 'sqeuclidean', got {metric!r}")
    xa = upcast_half(x)
    b, n, _ = xa.shape
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=-1)
    else:
        sq = (xa * xa).sum(-1)
    xt = xa.transpose(1, 2)
    out = torch.empty(b, n, n, dtype=xa.dtype, device=xa.device)
    for s in range(0, n, chunk):
        o = out[:, s:s + chunk]
        if xa.dtype == torch.float64:
            o.copy_(dots(xa[:, s:s + chunk], xa))
        else:
            torch.matmul(xa[:, s:s + chunk], xt, out=o)  # the dot products, in place
        if metric == "cosine":
            o.sub_(1.0).neg_()  # −(dot − 1) = 1 − dot exactly (rounding is sign-symmetric)
        else:
            # (‖a‖² + ‖b‖²) − 2·a·b: 2·dot is exact, so the fused subtraction rounds as the two-step one
            torch.sub(sq[:, s:s + chunk, None] + sq[:, None, :], o, alpha=2.0, out=o).clamp_min_(0.0)
            if metric == "euclidean":
                o.sqrt_()
    return out


def gram_matrix(x: Tensor, *, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """``[B, N, N]`` dot products ``x_i · x_j`` of ``x [B, N, D]`` (fp32 / fp64 as the input; callers upcast half
    precision), exactly symmetric off the diagonal blocks: row block ``[s, s + chunk)`` is computed against the
    tokens from ``s`` on and mirrored below, half the GEMM work of the full product (whose values it matches up to
    the last-bit rounding of a differently shaped GEMM). For callers that read rows only."""
    b, n, _ = x.shape
    out = torch.empty(b, n, n, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        blk = x[:, s:e] @ x[:, s:].transpose(1, 2)  # [B, e − s, N − s]
        out[:, s:e, s:] = blk
        out[:, e:, s:e] = blk[:, :, e - s:].transpose(1, 2)
    return out


def _row_lookup(mat: Tensor) -> tuple[Tensor, Tensor]:
    """``mat [B, N, N]`` viewed as ``[B·N, N]`` and the offset ``b·N`` of each sample's first row."""
    b, n, _ = mat.shape
    return mat.reshape(b * n, n), torch.arange(b, device=mat.device) * n


# The greedy loops below run ``k`` dependent steps of a few ``O(N)`` operations. On the CPU they run in NumPy on a
# zero-copy view of the matrix: the same IEEE operations (``minimum``, ``+``, first-index ``argmax`` / ``argmin``, NaN
# propagated and counted as the largest value as torch does), at ~1 µs per call instead of ~5–10 µs of torch dispatch.


def greedy_max_min(dist: Tensor, k: int, start: Tensor) -> Tensor:
    """Greedy k-center over a precomputed distance matrix ``dist [B, N, N]`` (row ``c`` = distances from token
    ``c``): ``start [B]`` first, then repeatedly the token farthest from its nearest pick (ties → lowest index).
    ``[B, k]`` in pick order. The diagonal is never read for a decision (a pick's own entry lands on a picked,
    masked token). Each step is a row lookup, ``O(B·N)``."""
    b, n, _ = dist.shape
    if dist.device.type == "cpu":
        flat, base = dist.detach().reshape(b * n, n).numpy(), np.arange(b) * n
        picks = np.empty((k, b), dtype=np.int64)
        picks[0] = start.cpu().numpy()
        idx = base + picks[0]
        mind = flat[idx]
        chosen = np.zeros(b * n, dtype=bool)
        chosen[idx] = True
        chosen = chosen.reshape(b, n)
        for t in range(1, k):
            nxt = np.where(chosen, -np.inf, mind).argmax(1)
            picks[t] = nxt
            idx = base + nxt
            chosen.reshape(-1)[idx] = True
            np.minimum(mind, flat[idx], out=mind)
        return torch.from_numpy(picks.T.copy())
    flat, tbase = _row_lookup(dist)
    picks = [start]
    idx = tbase + start
    mind = flat.index_select(0, idx)
    chosen = torch.zeros(b * n, dtype=torch.bool, device=dist.device)
    chosen[idx] = True
    chosen = chosen.view(b, n)
    for _ in range(1, k):
        nxt = mind.masked_fill(chosen, float("-inf")).argmax(1)
        picks.append(nxt)
        idx = tbase + nxt
        chosen.view(-1)[idx] = True
        torch.minimum(mind, flat.index_select(0, idx), out=mind)
    return torch.stack(picks, 1)


def greedy_max_sum(sim: Tensor, k: int, start: Tensor) -> Tensor:
    """Greedy max-sum (ToDRE v2) over a precomputed similarity matrix ``sim [B, N, N]``: ``start [B]`` first, then
    repeatedly the unpicked token with the smallest cumulative similarity to the picks (ties → lowest index).
    ``[B, k]`` in pick order; each step is a row lookup."""
    b, n, _ = sim.shape
    if sim.device.type == "cpu":
        flat, base = sim.detach().reshape(b * n, n).numpy(), np.arange(b) * n
        picks = np.empty((k, b), dtype=np.int64)
        picks[0] = start.cpu().numpy()
        idx = base + picks[0]
        cum = flat[idx]
        cum.reshape(-1)[idx] = np.inf  # picked tokens stay masked: inf + finite = inf
        for t in range(1, k):
            c = cum.argmin(1)  # first index, NaN counted as the smallest: as torch.argmin
            picks[t] = c
            idx = base + c
            cum += flat[idx]
            cum.reshape(-1)[idx] = np.inf
        return torch.from_numpy(picks.T.copy())
    flat, tbase = _row_lookup(sim)
    picks = [start]
    idx = tbase + start
    cum = flat.index_select(0, idx)
    cum.view(-1)[idx] = float("inf")
    for _ in range(1, k):
        c = cum.argmin(1)
        picks.append(c)
        idx = tbase + c
        cum += flat.index_select(0, idx)
        cum.view(-1)[idx] = float("inf")
    return torch.stack(picks, 1)


def nearest_neighbor_distance(x: Tensor, *, metric: str = "cosine", chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Distance from each token of ``x [B, N, D]`` to its nearest *other* token: ``[B, N]`` (fp32; fp64 for fp64 input).

    Rows are processed ``chunk`` at a time (``O(B·chunk·N)`` memory); features are normalised once."""
    if metric not in ("cosine", "euclidean", "sqeuclidean"):
        raise ValueError(f"metric must be 'cosine', 'euclidean' or 'sqeuclidean', got {metric!r}")
    b, n, _ = x.shape
    xa = upcast_half(x)
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=-1)
    sq = (xa * xa).sum(-1)
    out = []
    for s in range(0, n, chunk):
        dot = dots(xa[:, s:s + chunk], xa)
        if metric == "cosine":
            d = acc(1.0 - dot)
        else:
            d = acc((sq[:, s:s + chunk, None] + sq[:, None, :] - 2.0 * dot).clamp_min(0.0))
            d = d.sqrt() if metric == "euclidean" else d
        rows = torch.arange(s, min(s + chunk, n), device=x.device)
        d[:, torch.arange(rows.numel(), device=x.device), rows] = float("inf")
        out.append(d.min(-1).values)
    return torch.cat(out, 1)


def farthest_point(x: Tensor, k: int, *, start: Tensor | None = None, metric: str = "cosine") -> Tensor:
    """Greedy k-center / max-min selection over ``x [B, N, D]``: ``k`` indices ``[B, k]`` in selection order.

    Step 1 takes ``start [B]`` (default token 0); each next step takes the token whose distance to its nearest
    selected token is largest (ties → lowest index). Distances are computed in the input's precision (fp64 stays
    fp64; half precision is upcast to fp32). Where the samples' ``N × N`` matrices fit :data:`GRAM_MAX_ELEMENTS`,
    all distances come from one GEMM (``pairwise_matrix``) and each of the ``k`` steps is a row lookup
    (:func:`greedy_max_min`); otherwise (streaming) features are normalised / squared norms taken once and each step
    is one ``[N, D] × [D]`` product, memory ``O(B·N)``. Both compute the same distances up to the last-bit rounding
    of a GEMM against a matrix-vector product, which decides a pick only on a near-tie at that level.
    """
    if metric not in ("cosine", "euclidean", "sqeuclidean"):
        raise ValueError(f"metric must be 'cosine', 'euclidean' or 'sqeuclidean', got {metric!r}")
    b, n, _ = x.shape
    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=x.device)
    groups = gram_groups(b, n)
    if groups is not None:
        return torch.cat([greedy_max_min(pairwise_matrix(x[g], metric), k, start[g]) for g in groups])
    return _farthest_point_streaming(x, k, start, metric)


def _farthest_point_streaming(x: Tensor, k: int, start: Tensor, metric: str) -> Tensor:
    """``farthest_point`` without an ``N × N`` matrix: one ``[N, D] × [D]`` product per step, memory ``O(B·N)``."""
    b, n, _ = x.shape
    rows = torch.arange(b, device=x.device)
    xa = upcast_half(x)
    if metric == "cosine":
        xa = torch.nn.functional.normalize(xa, dim=-1)
    else:
        sq = (xa * xa).sum(-1)

    def dist_to(c: Tensor) -> Tensor:  # c: [B] token index → [B, N] distances (fp32, or fp64 for fp64 input)
        dot = torch.bmm(xa, xa[rows, c][:, :, None])[..., 0]
        if metric == "cosine":
            return 1.0 - dot
        d2 = (sq + sq[rows, c][:, None] - 2.0 * dot).clamp_min(0.0)
        return d2.sqrt() if metric == "euclidean" else d2

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


def max_min_diverse(x: Tensor, k: int) -> Tensor:
    """DivPrune's greedy max–min on cosine distance over ``x [B, N, D]``: ``[B, k]`` in pick order.

    The first pick is the most isolated token, ``argmax_i min_{j≠i} d(i, j)`` (compared in fp32, fp64 for fp64 input, as
    ``nearest_neighbor_distance`` returns it), then ``farthest_point`` from it. Where the ``N × N`` matrices fit
    :data:`GRAM_MAX_ELEMENTS` both steps read one cosine-distance matrix (one GEMM: the nearest-neighbour distances are
    exactly ``nearest_neighbor_distance``'s, the greedy steps are row lookups); otherwise the streaming
    ``nearest_neighbor_distance`` + ``farthest_point``.
    """
    b, n, _ = x.shape
    groups = gram_groups(b, n)
    if groups is None:
        start = nearest_neighbor_distance(x, metric="cosine").argmax(1)
        return _farthest_point_streaming(x, k, start, "cosine")
    out = []
    for g in groups:
        dist = pairwise_matrix(x[g], "cosine")
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # nearest *other* token; never read by the greedy steps
        start = acc(dist.min(-1).values).argmax(1)  # a cast is monotone: min then cast = cast then min
        out.append(greedy_max_min(dist, k, start))
    return torch.cat(out)


def topk_gather(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of ``scores [B, N]`` (ties → lowest index), returned in ascending index order, and
    ``x [B, N, D]`` gathered there: ``(idx [B, k], x_kept [B, k, D])``."""
    idx = stable_topk(scores, k)
    return idx, gather_tokens(x, idx)


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices ``[B, k]`` of the ``k`` largest ``scores [B, N]``, ties broken by lower index, sorted ascending."""
    order = torch.sort(acc(scores), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def pagerank(attn: Tensor, *, iters: int = 30, damping: float | None = None, init: Tensor | None = None) -> Tensor:
    """Importance by power iteration on an attention graph ``attn [B, N, N]`` (row-stochastic, row = query).

    Iterates ``s ← Aᵀ s`` (a token is important when important tokens attend to it), normalised to sum 1; with
    ``damping`` d, ``s ← d Aᵀ s + (1 − d)/N``. Returns ``[B, N]`` (fp32; fp64 for fp64 input).
    """
    a = acc(attn)
    b, n, _ = a.shape
    s = torch.full((b, n), 1.0 / n, device=a.device, dtype=a.dtype) if init is None \
        else init.to(a.dtype) / init.to(a.dtype).sum(1, True)
    for _ in range(iters):
        s = torch.einsum("bmn,bm->bn", a, s)
        if damping is not None:
            s = damping * s + (1.0 - damping) / n
        s = s / s.sum(1, keepdim=True).clamp_min(1e-30)
    return s


def kmeans_assign(x: Tensor, centroids: Tensor, *, chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Nearest centroid (squared Euclidean) for each token: ``x [B, N, D]``, ``centroids [B, C, D]`` →
    ``(assign [B, N] long, dist [B, N] fp32 / fp64 as the input)``; ties → lowest centroid index. Chunked over
    ``N``; each chunk's distances are ``pairwise_distance(x[:, s:s + chunk], centroids, "sqeuclidean")``, with the
    squared norms taken once for all chunks (the same per-row sums)."""
    xa, ca = upcast_half(x), upcast_half(centroids)
    sq_x, sq_c = (xa * xa).sum(-1), (ca * ca).sum(-1)[:, None, :]
    idxs, ds = [], []
    for s in range(0, x.shape[1], chunk):
        d = torch.sub(sq_x[:, s:s + chunk, None] + sq_c, dots(xa[:, s:s + chunk], ca), alpha=2.0).clamp_min_(0.0)
        d = acc(d)
        v, i = d.min(-1)
        idxs.append(i)
        ds.append(v)
    return torch.cat(idxs, 1), torch.cat(ds, 1)


def segment_stats(x: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """Per-frame mean and same-position cosine similarity to the previous frame.

    ``x [B, T*P, D]`` with ``T = frames`` → ``(mean [B, T, D], sim_prev [B, T, P])`` in fp32 (fp64 for fp64
    input); frame 0 has similarity 0 (it has no predecessor).
    """
    b, n, d = x.shape
    p = n // frames
    xf = acc(x).view(b, frames, p, d)
    mean = xf.mean(2)
    xn = torch.nn.functional.normalize(xf, dim=-1)
    sim = torch.zeros(b, frames, p, device=x.device, dtype=xf.dtype)
    if frames > 1:
        sim[:, 1:] = (xn[:, 1:] * xn[:, :-1]).sum(-1)
    return mean, sim


# --- diversity / clustering primitives ---


def density_peaks(x: Tensor, knn: int, *, include_self: bool = True,
                  chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Density-peaks scores with kNN density over ``x [B, N, D]`` (Euclidean distance): ``(rho, delta)`` ``[B, N]``.

    ``rho_i = exp(−(1/k) Σ_{j ∈ kNN(i)} d(i, j)²)``. With ``include_self=True`` (TCFormer's / Chat-UniVi's code:
    ``torch.topk`` over the full distance row) the token itself, at distance 0, is one of its ``k = min(knn, N)``
    nearest neighbours, so the sum runs over its ``k − 1`` nearest other tokens and is divided by ``k``. With
    ``include_self=False`` (the DPC-kNN paper's definition) it runs over the ``k = min(knn, N − 1)`` nearest *other*
    tokens (``rho = 1`` when there are none). ``delta_i`` = distance to the nearest token that is denser, with ties
    in ``rho`` broken by index (a lower index counts as denser), so exactly one token per row, the densest, has none
    and gets the largest distance in its sample instead. Computed in the input's precision (fp64 stays fp64, fp32
    otherwise). Where the ``N × N`` matrices fit :data:`GRAM_MAX_ELEMENTS` the squared distances are computed once
    (``pairwise_matrix``) and both passes read them (``δ`` as the square root of the smallest squared distance to a
    denser token, the same number); otherwise two chunked passes recompute them, memory ``O(B·chunk·N)``.
    """
    b, n, _ = x.shape
    groups = gram_groups(b, n)
    if groups is not None:
        parts = [_density_peaks_matrix(x[g], knn, include_self, chunk) for g in groups]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    kk = min(int(knn), n) if include_self else min(int(knn), n - 1)
    others = kk - 1 if include_self else kk  # how many other tokens enter the sum
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
    dmax = torch.cat(rowmax, 1).max(1).values.sqrt()  # [B]
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


def _density_peaks_matrix(x: Tensor, knn: int, include_self: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """``density_peaks`` from one ``N × N`` squared-distance matrix (same values as its streaming passes)."""
    b, n, _ = x.shape
    kk = min(int(knn), n) if include_self else min(int(knn), n - 1)
    others = kk - 1 if include_self else kk
    d2 = pairwise_matrix(x, "sqeuclidean", chunk=chunk)
    dmax = d2.amax(-1).amax(1).sqrt()  # [B]
    if others > 0:
        d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))  # the token itself (never denser than itself either)
        near = d2.topk(others, dim=-1, largest=False).values
        density = torch.exp(-(near.sum(-1) / kk if include_self else near.mean(-1)))
    else:
        density = torch.ones(b, n, device=x.device, dtype=d2.dtype)
    # rank in (descending density, ascending index) order: j is denser than i  <=>  rank_j < rank_i
    order = torch.sort(density, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n).contiguous())
    deltas = []
    for s in range(0, n, chunk):
        not_denser = rank[:, None, :] >= rank[:, s:s + chunk, None]
        dl = d2[:, s:s + chunk].masked_fill(not_denser, float("inf")).amin(-1).sqrt_()  # sqrt is monotone
        deltas.append(torch.where(torch.isinf(dl), dmax[:, None].expand_as(dl), dl))
    return density, torch.cat(deltas, 1)


def cluster_medoids(x: Tensor, labels: Tensor, c: int, *, metric: str = "euclidean",
                    chunk: int = DEFAULT_CHUNK, dist: Tensor | None = None) -> Tensor:
    """Medoid of each cluster: ``x [B, N, D]``, ``labels [B, N]`` in ``[0, c)`` → ``[B, c]`` token indices.

    The medoid is the member with the smallest sum of distances (``metric`` as in ``pairwise_distance``) to the
    other members of its cluster; ties → lowest index (e.g. both members of a pair); an empty cluster gets ``N``.
    A token's distance to itself counts as exactly 0 (the ``‖a‖² + ‖b‖² − 2a·b`` form leaves rounding noise there,
    which would otherwise decide pairs and, in fp32, near-ties). Sums are accumulated in the input's precision
    (fp64 stays fp64, fp32 otherwise). Chunked over rows: memory ``O(B·chunk·N)`` (the compute is ``O(N²·D)``,
    inherent to medoids). ``dist``: the ``pairwise_matrix(x, metric)`` of ``x`` with its diagonal already set to 0,
    when the caller holds it (an iterative caller computes it once); the result is the same.
    """
    b, n, _ = x.shape
    x = upcast_half(x)
    cost = torch.empty(b, n, device=x.device, dtype=x.dtype)
    for s in range(0, n, chunk):
        if dist is None:
            d = pairwise_distance_native(x[:, s:s + chunk], x, metric)
            rows = torch.arange(s, min(s + chunk, n), device=x.device)
            d[:, torch.arange(rows.numel(), device=x.device), rows] = 0.0  # exactly 0: no GEMM rounding there
        else:
            d = dist[:, s:s + chunk]
        same = labels[:, s:s + chunk, None] == labels[:, None, :]
        cost[:, s:s + chunk] = (d * same).sum(-1)
    best = torch.full((b, c), float("inf"), device=x.device, dtype=cost.dtype).scatter_reduce(1, labels, cost, "amin")
    is_best = cost == best.gather(1, labels)
    idx = torch.where(is_best, torch.arange(n, device=x.device).expand(b, n), torch.full_like(labels, n))
    return torch.full((b, c), n, dtype=torch.long, device=x.device).scatter_reduce(1, labels, idx, "amin")
