"""Fidelity of ``kmedoids`` and ``dpc_knn`` to their authors' public code, against plain float64 references.

The references below are written from the algorithms as the authors' code runs them (CenterCLIP's
``batch_fast_kmedoids`` with their scripts' settings; TCFormer's / Chat-UniVi's ``cluster_dpc_knn``), one sample at a
time, with explicit loops over an exact pairwise distance matrix (differences, not the ``‖a‖² + ‖b‖² − 2a·b`` form:
symmetric and 0 on the diagonal). Ties are resolved as the documented rule says (lowest index; the authors' random
1e-6 density noise is replaced by it). vtok's defaults must give exactly the same kept tokens / assignments on many
random float64 inputs, in batches; the named options must give vtok's earlier behaviour.
"""

import math

import pytest
import torch

import vtok
from vtok.context import Context
from vtok.kernels import ops

SHAPES = [(13, 3), (24, 8), (40, 5), (64, 16)]  # (N, D)
SEEDS = range(10)  # x 4 shapes x batch 3 = 120 random samples per k
B = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops: a second intra-op thread only adds synchronisation stalls on a busy 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _batches():
    for seed in SEEDS:
        g = torch.Generator().manual_seed(1000 + seed)
        for n, d in SHAPES:
            yield torch.randn(B, n, d, generator=g, dtype=torch.float64)


def _budgets(n):
    return sorted({1, 2, 3, n // 4, n // 2, n - 1} - {0})


def _exact_distances(x, metric="euclidean"):
    """``[N, N]`` float64 distances of one sample ``x [N, D]``: exactly symmetric, exactly 0 on the diagonal."""
    if metric == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True)
        dist = 1.0 - (xn[:, None, :] * xn[None, :, :]).sum(-1)
    else:
        dist = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).sqrt()
    return dist.fill_diagonal_(0.0)


# -------------------------------------------------------------------------------------- k-medoids (CenterCLIP)


def _first_argmin(values):
    best = 0
    for i, v in enumerate(values):
        if v < values[best]:
            best = i
    return best


def _ref_kmedoids(x, k, metric="euclidean", init="kkz", iters=100, tol=1e-6):
    """k-medoids of one sample ``x [N, D]`` (float64) → sorted medoid indices.

    ``init="kkz"`` (CenterCLIP): first the token of largest L2 norm, then repeatedly the token whose distance to its
    nearest chosen medoid is largest; cluster ``c`` is the ``c``-th pick. ``init="central"`` (vtok's earlier
    k-medoids): first the token with the smallest total distance to all, then the same farthest-point picks, and the
    clusters are numbered by ascending medoid index (re-sorted after every update). Each iteration: every
    non-medoid token joins its nearest medoid (ties → lower cluster number), each medoid joins its own cluster; each
    cluster's new medoid is its member with the smallest sum of distances to the members (ties → lowest index).
    Stop after the first update that moves the medoids by ``Σ_c ‖x[new_c] − x[old_c]‖ < tol`` or leaves them
    unchanged, or after ``iters`` updates.
    """
    n = x.shape[0]
    dist = _exact_distances(x, metric).tolist()
    if init == "kkz":
        norms = [math.sqrt(sum(v * v for v in row)) for row in x.tolist()]
        first = max(range(n), key=lambda i: (norms[i], -i))
    else:
        first = _first_argmin([sum(row) for row in dist])
    med = [first]
    while len(med) < k:
        best_i, best_d = None, -math.inf
        for i in range(n):
            if i in med:
                continue
            dmin = min(dist[i][m] for m in med)
            if dmin > best_d:
                best_i, best_d = i, dmin
        med.append(best_i)
    if init == "central":
        med.sort()
    for _ in range(iters):
        labels = [med.index(i) if i in med else _first_argmin([dist[i][m] for m in med]) for i in range(n)]
        new = []
        for c in range(k):
            members = [i for i in range(n) if labels[i] == c]
            new.append(members[_first_argmin([sum(dist[i][j] for j in members) for i in members])])
        if init == "central":
            new.sort()
        shift = sum(float((x[a] - x[b]).norm()) for a, b in zip(new, med, strict=True))
        unchanged = new == med
        med = new
        if shift < tol or unchanged:
            break
    return sorted(med)


def _kmedoids(x, k, **opts):
    return vtok.get_method("kmedoids").fn(x, k, Context.build(x, {}), **opts).validate()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmedoids_default_matches_centerclip_reference(metric):
    count = 0
    for x in _batches():
        n = x.shape[1]
        for k in _budgets(n):
            sel = _kmedoids(x, k, metric=metric) if metric == "cosine" else _kmedoids(x, k)
            assert sel.assign is None
            for b in range(B):
                ref = _ref_kmedoids(x[b], k, metric=metric)
                assert sel.keep[b].tolist() == ref, (n, k, b)
                count += 1
    assert count >= 600


def test_kmedoids_central_option_is_the_earlier_vtok_algorithm():
    for x in _batches():
        n = x.shape[1]
        for k in _budgets(n):
            for metric in ("euclidean", "cosine"):
                sel = _kmedoids(x, k, init="central", metric=metric, iters=10, tol=0)
                for b in range(B):
                    ref = _ref_kmedoids(x[b], k, metric=metric, init="central", iters=10, tol=0.0)
                    assert sel.keep[b].tolist() == ref, (n, k, b, metric)


def test_kmedoids_iteration_cap_and_tolerance():
    differs = 0
    for x in list(_batches())[:8]:
        n = x.shape[1]
        k = n // 4
        one = _kmedoids(x, k, iters=1)
        early = _kmedoids(x, k, tol=1e9)  # any update stops: the first one is kept
        full = _kmedoids(x, k)
        assert torch.equal(one.keep, early.keep)
        for b in range(B):
            assert one.keep[b].tolist() == _ref_kmedoids(x[b], k, iters=1)
            differs += one.keep[b].tolist() != full.keep[b].tolist()
    assert differs > 0  # the cap matters on these inputs: several updates are needed to converge


def test_kmedoids_kkz_init_is_largest_norm_then_farthest():
    # k = 1 with a single update: the largest-norm token's cluster is everything, so the medoid is the most central;
    # the KKZ start itself shows through the farthest-point op, which keeps fp64 (1 + 1e-12 vs 1 is an fp32 tie)
    x = torch.tensor([[[0.0], [1.0], [-1.0 - 1e-12], [0.2]]], dtype=torch.float64)
    assert ops.farthest_point(x, 2, start=torch.tensor([0]), metric="euclidean")[0].tolist() == [0, 2]
    assert ops.farthest_point(x.float(), 2, start=torch.tensor([0]), metric="euclidean")[0].tolist() == [0, 1]
    assert _kmedoids(x, 1).keep[0].tolist() == [0]


def test_kmedoids_keeps_float64():
    x = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 30), generator=torch.Generator().manual_seed(1))
    med = ops.cluster_medoids(x, labels, 3)
    for b in range(2):
        dist = _exact_distances(x[b])
        for c in range(3):
            members = (labels[b] == c).nonzero()[:, 0]
            cost = dist[members][:, members].sum(1)
            assert med[b, c] == members[int(cost.argmin())]
    # a pair's medoid is its lower index: the self-distance counts as exactly 0 (no GEMM rounding noise)
    pair = torch.randn(1, 2, 7, generator=torch.Generator().manual_seed(2)) * 100
    assert ops.cluster_medoids(pair, torch.zeros(1, 2, dtype=torch.long), 1).tolist() == [[0]]


def test_kmedoids_option_errors(tokens4):
    with pytest.raises(ValueError, match="init"):
        vtok.compress(tokens4, "kmedoids", keep=4, init="kmeans++")
    with pytest.raises(ValueError, match="tol"):
        vtok.compress(tokens4, "kmedoids", keep=4, tol=-1.0)
    with pytest.raises(ValueError, match="tol"):
        vtok.compress(tokens4, "kmedoids", keep=4, tol=True)
    with pytest.raises(ValueError, match="iters"):
        vtok.compress(tokens4, "kmedoids", keep=4, iters=0)


# ------------------------------------------------------------------------------------ DPC-kNN (TCFormer code)


def _ref_dpc_knn(x, k, knn=5, include_self=True):
    """DPC-kNN of one sample ``x [N, D]`` (float64) → (sorted centres, slot of each token, centres in score order,
    cluster of each token in that order).

    ``d = ‖x_i − x_j‖ / √D``. ``include_self``: the k nearest entries of the full distance row (the token itself at
    0 among them), ``k = min(knn, N)``, averaged over ``k``; otherwise the ``min(knn, N − 1)`` nearest other tokens.
    ``ρ = exp(−mean d²)``; ``δ`` = distance to the nearest denser token (equal ``ρ``: lower index is denser), the
    largest distance in the sample for the densest. Centres: the ``k`` largest ``ρ·δ`` (ties → lower index), in
    score order; each token joins its nearest centre (ties → the earlier centre in score order), centres their own.
    """
    n, d = x.shape
    dist = (_exact_distances(x) / math.sqrt(d)).tolist()
    rho = []
    for i in range(n):
        if include_self:
            kk = min(knn, n)
            near = sorted(dist[i])[:kk]
        else:
            kk = min(knn, n - 1)
            near = sorted(dist[i][j] for j in range(n) if j != i)[:kk]
        rho.append(math.exp(-sum(v * v for v in near) / kk) if kk else 1.0)
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(dist[i][j] for j in denser) if denser else dmax)
    score = [r * dl for r, dl in zip(rho, delta, strict=True)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:k]
    cluster = [centres.index(i) if i in centres else _first_argmin([dist[i][c] for c in centres]) for i in range(n)]
    keep = sorted(centres)
    return keep, [keep.index(centres[c]) for c in cluster], centres, cluster


def _dpc(x, k, **opts):
    return vtok.get_method("dpc_knn").fn(x, k, Context.build(x, {}), **opts).validate()


@pytest.mark.parametrize("knn", [1, 2, 3, 5, 8])
def test_dpc_knn_default_matches_tcformer_reference(knn):
    count = 0
    for x in _batches():
        n = x.shape[1]
        for k in _budgets(n):
            sel = _dpc(x, k) if knn == 5 else _dpc(x, k, knn=knn)
            out = sel.apply(x)
            for b in range(B):
                keep, assign, centres, cluster = _ref_dpc_knn(x[b], k, knn=knn)
                assert sel.keep[b].tolist() == keep, (n, k, knn, b)
                assert sel.assign[b].tolist() == assign, (n, k, knn, b)
                # emitted as the authors' merge_tokens does: clusters in descending centre score
                assert sel.emitted_keep()[b].tolist() == centres
                assert sel.output_of_each_token()[b].tolist() == cluster
                for j in range(k):  # each output token is the plain mean of its cluster (Chat-UniVi's unit weights)
                    members = [i for i in range(n) if cluster[i] == j]
                    assert torch.allclose(out[b, j], x[b, members].mean(0), rtol=1e-12, atol=1e-12)
                count += 1
    assert count >= 600


@pytest.mark.parametrize("knn", [1, 2, 5])
def test_dpc_knn_include_self_false_is_the_earlier_behaviour(knn):
    differs = 0
    for x in _batches():
        n = x.shape[1]
        for k in _budgets(n):
            sel = _dpc(x, k, knn=knn, include_self=False)
            default = _dpc(x, k, knn=knn)
            for b in range(B):
                keep, assign, _, _ = _ref_dpc_knn(x[b], k, knn=knn, include_self=False)
                assert sel.keep[b].tolist() == keep and sel.assign[b].tolist() == assign, (n, k, knn, b)
            differs += not torch.equal(sel.keep, default.keep)
    assert differs > 0  # counting the token itself changes the centres on these inputs


def test_dpc_knn_density_counts_self():
    x = torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for knn in (1, 2, 5, 20, 50):
        rho, _ = ops.density_peaks(x, knn)
        rho_paper, _ = ops.density_peaks(x, knn, include_self=False)
        assert rho.dtype == torch.float64
        for b in range(2):
            d2 = _exact_distances(x[b]).pow(2)
            kk = min(knn, 20)
            want = torch.exp(-d2.sort(1).values[:, :kk].sum(1) / kk)  # the row's kk smallest, self (0) included
            torch.testing.assert_close(rho[b], want, rtol=1e-12, atol=0)
            kk = min(knn, 19)
            others = d2.masked_fill(torch.eye(20, dtype=torch.bool), math.inf).sort(1).values[:, :kk]
            torch.testing.assert_close(rho_paper[b], torch.exp(-others.mean(1)), rtol=1e-12, atol=0)


def test_dpc_knn_option_errors(tokens4):
    with pytest.raises(ValueError, match="include_self"):
        vtok.compress(tokens4, "dpc_knn", keep=4, include_self=1)
    with pytest.raises(ValueError, match="knn"):
        vtok.compress(tokens4, "dpc_knn", keep=4, knn=0)
