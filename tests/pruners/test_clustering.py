import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.cluster import KMeans

import vtok
from tests.helpers.hyp_settings import examples
from tests.helpers.memtools import max_alloc_bytes, nxn_bytes
from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as R
from vtok.pruners.kmeans import kmeans_pp_init

METHODS = ["tome", "kmeans", "kmedoids", "dpc_knn"]
MERGING = ["tome", "kmeans", "dpc_knn"]


def _three_groups():
    """9 points in 2-D, three tight, far-apart groups, interleaved in index order.

    group 0 around (0, 0): tokens 0, 3, 6 (medoid = closest to the mean: 0)
    group 1 around (10, 0): tokens 1, 4, 8 (medoid = closest to the mean: 8)
    group 2 around (0, 10): tokens 2, 5, 7 (medoid = closest to the mean: 5)
    """
    pts = [(0, 0), (10, 0), (0, 10), (0.2, 0), (10.2, 0), (0, 10.1), (-0.2, 0), (0, 10.2), (10.1, 0)]
    return torch.tensor(pts, dtype=torch.float32)[None], [0, 1, 2, 0, 1, 2, 0, 2, 1]


def _partition(labels):
    """Canonical form of a clustering: sorted tuple of member tuples."""
    groups = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(tuple(g) for g in groups.values())


def _check_merge_selection(sel, n):
    """Every token is assigned, every slot is non-empty and holds its own representative."""
    a, keep = sel.assign, sel.keep
    assert (a >= 0).all() and (a < sel.k).all()
    assert torch.equal(a.gather(1, keep), torch.arange(sel.k).expand_as(keep))
    assert torch.equal(sel.token_sizes() if sel.size is None else sel.size,
                       torch.zeros(sel.batch, sel.k).scatter_add_(1, a, torch.ones(a.shape)))


# ------------------------------------------------------------------------------------------------ naive ToMe


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True)) / (math.sqrt(sum(a * a for a in u)) *
                                                             math.sqrt(sum(b * b for b in v)))


def _naive_tome(x, k, feats=None, sizes=None, protect=0, order="tome"):
    """ToMe bipartite soft matching with plain Python loops, repeated until k tokens remain. After each step the
    sequence is ``[protected | unmerged A | B]`` (ToMe's code: unmerged A by descending score, ascending when tokens
    are protected) for ``order="tome"``, or kept in position order for ``order="position"``.

    Returns (positions, output index of each token, out, size), all in emitted order, for one sample ``x [N, D]``.
    """
    n = x.shape[0]
    xs = x.double().tolist()
    fs = (x if feats is None else feats).double().tolist()
    sz = [1.0] * n if sizes is None else sizes.double().tolist()
    # each current token: representative index, members, size, matching feature
    seq = [{"rep": i, "members": [i], "size": sz[i], "f": fs[i]} for i in range(n)]
    while len(seq) > k:
        m = len(seq)
        edges = []
        for a in range(0, m, 2):
            if a < protect:
                continue
            best, partner = -math.inf, None
            for b in range(1, m, 2):
                if b < protect:
                    continue
                c = _cos(seq[a]["f"], seq[b]["f"])
                if c > best:
                    best, partner = c, b
            edges.append((-best, a, partner))
        edges.sort()
        merged = edges[:min(m - k, len(edges))]
        incoming = {}
        for _, a, b in merged:
            incoming.setdefault(b, []).append(a)
        for b, srcs in incoming.items():
            dst = seq[b]
            tot = dst["size"] + sum(seq[a]["size"] for a in srcs)
            dst["f"] = [(dst["f"][d] * dst["size"] + sum(seq[a]["f"][d] * seq[a]["size"] for a in srcs)) / tot
                        for d in range(len(dst["f"]))]
            dst["size"] = tot
            for a in srcs:
                dst["members"] += seq[a]["members"]
        gone = {a for _, a, _ in merged}
        if order == "position":
            seq = [t for i, t in enumerate(seq) if i not in gone]
        else:
            unm = [a for _, a, _ in edges[len(merged):]]
            if protect:
                unm = sorted(unm)
            seq = ([seq[i] for i in range(min(protect, m))] + [seq[a] for a in unm]
                   + [seq[i] for i in range(1, m, 2) if i >= protect])
    keep = [t["rep"] for t in seq]
    assign = [0] * n
    out = []
    for slot, t in enumerate(seq):
        for i in t["members"]:
            assign[i] = slot
        w = sum(sz[i] for i in t["members"])
        out.append([sum(xs[i][d] * sz[i] for i in t["members"]) / w for d in range(x.shape[1])])
    return keep, assign, torch.tensor(out), [t["size"] for t in seq]


# ------------------------------------------------------------------------------------------- hand-computed


def test_tome_hand_computed_pairs():
    # pairs (0, 1), (2, 3), (4, 5) point the same way (A = even, B = odd); the pairs differ a lot
    x = torch.tensor([[1.0, 0, 0], [1, 0.05, 0], [0, 1, 0], [0.1, 1, 0], [0, 0, 1], [0, 0.02, 1]])[None]
    out, sel = vtok.compress(x, "tome", keep=3)
    assert sel.keep[0].tolist() == [1, 3, 5]
    assert sel.assign[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(out[0], (x[0, 0::2] + x[0, 1::2]) / 2)
    assert sel.size[0].tolist() == [2, 2, 2]
    # r = 2: the two most similar edges (cos of pair (4, 5) > (0, 1) > (2, 3)) merge; token 2 stays on its own
    _, sel = vtok.compress(x, "tome", keep=4)
    assert sel.keep[0].tolist() == [1, 2, 3, 5] and sel.assign[0].tolist() == [0, 0, 1, 2, 3, 3]
    # protect_first=1 (a CLS token): token 0 never merges, so (2, 3) merges instead
    _, sel = vtok.compress(x, "tome", keep=4, protect_first=1)
    assert sel.keep[0].tolist() == [0, 1, 3, 5] and sel.assign[0].tolist() == [0, 1, 2, 2, 3, 3]
    # protect_first=2: token 1 (in B) receives nothing either; A tokens 2 and 4 go to their partners 3 and 5
    _, sel = vtok.compress(x, "tome", keep=4, protect_first=2)
    assert sel.keep[0].tolist() == [0, 1, 3, 5] and sel.assign[0].tolist() == [0, 1, 2, 2, 3, 3]


def test_tome_sizes_weight_merge_and_accumulate():
    x = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]])[None]
    sizes = torch.tensor([[3.0, 1, 2, 2]])
    out, sel = vtok.compress(x, "tome", keep=2, sizes=sizes)
    assert sel.size[0].tolist() == [4, 4]
    assert torch.allclose(out[0, 0], (3 * x[0, 0] + x[0, 1]) / 4)
    assert torch.allclose(out[0, 1], (x[0, 2] + x[0, 3]) / 2)


def test_tome_uses_keys_mean_over_heads():
    # tokens say (0, 1) similar, keys say (0, 3) similar: keys win
    x = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [-1, 0]])[None]
    keys = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [1, 0.01]])[None]
    _, sel = vtok.compress(x, "tome", keep=3)
    assert sel.assign[0].tolist() == [0, 0, 1, 2]
    _, sel = vtok.compress(x, "tome", keep=3, keys=keys)
    assert sel.assign[0].tolist() == [2, 0, 1, 2]  # 0 merges into 3
    per_head = torch.stack([keys + 0.3, keys - 0.3], 1)  # [B, H, N, dh], mean over heads = keys
    _, sel_h = vtok.compress(x, "tome", keep=3, keys=per_head)
    assert torch.equal(sel_h.assign, sel.assign)


@pytest.mark.parametrize("method", ["kmeans", "dpc_knn"])
def test_centroid_mergers_hand_computed(method):
    x, groups = _three_groups()
    out, sel = vtok.compress(x, method, keep=3)
    assert _partition(sel.assign[0].tolist()) == _partition(groups)
    for j in range(3):
        members = [i for i in range(9) if sel.output_of_each_token()[0, i] == j]
        assert torch.allclose(out[0, j], x[0, members].mean(0), atol=1e-6)
    if method == "kmeans":
        assert sel.keep[0].tolist() == [0, 5, 8]  # the member closest to each centroid
    else:
        # DPC centres: one per group (the highest density x separation); every group is a cluster
        assert sorted(groups[i] for i in sel.keep[0].tolist()) == [0, 1, 2]
    _check_merge_selection(sel, 9)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_kmedoids_hand_computed(metric):
    x, groups = _three_groups()
    x = x + torch.tensor([1.0, 1.0])  # move off the origin so cosine distance is defined everywhere
    out, sel = vtok.compress(x, "kmedoids", keep=3, metric=metric)
    assert sel.assign is None and torch.equal(out[0], x[0, sel.keep[0]])  # medoids are real tokens
    assert sorted(groups[i] for i in sel.keep[0].tolist()) == [0, 1, 2]
    if metric == "euclidean":
        assert sel.keep[0].tolist() == [0, 5, 8]  # the middle point of each group


def test_kmedoids_single_is_most_central():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])[None]
    _, sel = vtok.compress(x, "kmedoids", keep=1)
    assert sel.keep[0].tolist() == [2]


def test_dpc_knn_density_and_centres_hand_computed():
    # include_self=False (the DPC-kNN paper's reading, vtok's earlier default): the mean over the knn nearest others
    # a blob of 4 around 0 and a blob of 3 around 5 (1-D): one centre per blob, the densest member of each
    x = torch.tensor([[0.0], [5.0], [0.1], [5.1], [-0.1], [4.9], [0.05]])[None]
    out, sel = vtok.compress(x, "dpc_knn", keep=2, knn=2, include_self=False, order="position")
    assert sel.keep[0].tolist() == [1, 6]  # 0.05: nearest two at 0.05; 5.0: nearest two at 0.1
    assert sel.assign[0].tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert torch.allclose(out[0], torch.tensor([[5.0], [0.0125]]))
    # the default emits clusters by descending centre score (the authors' merge_tokens): the blob of 4 first
    out_s, sel_s = vtok.compress(x, "dpc_knn", keep=2, knn=2, include_self=False)
    assert sel_s.emitted_keep()[0].tolist() == [6, 1] and torch.allclose(out_s[0], out[0].flip(0))
    # a dense blob of 4 at 0 and lone points at 5 and 9
    x = torch.tensor([[0.0], [0.1], [-0.1], [0.05], [5.0], [9.0]])[None]
    rho, delta = ops.density_peaks(x, 2, include_self=False)
    # the lone point at 9 has delta = distance to 5 (denser) and rho from its 2-NN (5 and 0.1)
    assert torch.isclose(delta[0, 5], torch.tensor(4.0))
    assert torch.isclose(rho[0, 5], torch.exp(torch.tensor(-(4.0 ** 2 + 8.9 ** 2) / 2)), rtol=1e-4)
    # densest token's delta is the largest distance in the sample
    densest = int(rho[0].argmax())
    assert torch.isclose(delta[0, densest], torch.tensor(9.1))
    # include_self=True (default, the authors' code): the token itself is one of its knn, so knn=2 = self + 1 other
    rho, delta = ops.density_peaks(x, 2)
    assert torch.isclose(rho[0, 5], torch.exp(torch.tensor(-(4.0 ** 2 + 0.0) / 2)), rtol=1e-4)
    assert torch.isclose(delta[0, 5], torch.tensor(4.0))
    assert torch.isclose(delta[0, int(rho[0].argmax())], torch.tensor(9.1))
    rho1, _ = ops.density_peaks(x, 1)  # self only: every density is exp(0) = 1
    assert torch.equal(rho1, torch.ones(1, 6))


def test_dpc_knn_include_self_changes_the_densest():
    # a tight pair at 0 / 0.1 far from a triplet 1.0 / 1.15 / 1.3. knn=2 with self: only the nearest other counts,
    # so the pair (0.1 apart) is densest; without self: the mean of the two nearest others, and the triplet's middle
    # token (0.15 and 0.15) beats the pair (0.1 and 1.0).
    x = torch.tensor([[0.0], [0.1], [1.0], [1.15], [1.3]], dtype=torch.float64)[None]
    _, sel = vtok.compress(x, "dpc_knn", keep=1, knn=2)
    assert sel.keep[0].tolist() == [0]  # 0 and 1 tie: the lower index counts as denser
    _, sel = vtok.compress(x, "dpc_knn", keep=1, knn=2, include_self=False)
    assert sel.keep[0].tolist() == [3]
    out, sel = vtok.compress(x, "dpc_knn", keep=2, knn=2)
    assert sel.keep[0].tolist() == [0, 2] and sel.assign[0].tolist() == [0, 0, 1, 1, 1]
    assert torch.allclose(out[0], torch.tensor([[0.05], [1.15]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_exact_identity(method, tokens4):
    fn = vtok.get_method(method).fn
    s = fn(tokens4, 24, Context.build(tokens4, {})).validate()
    assert torch.equal(s.keep, torch.arange(24).expand(4, 24))
    assert s.assign is None or torch.equal(s.assign, torch.arange(24).expand(4, 24))
    assert torch.equal(s.apply(tokens4), tokens4)
    sizes = torch.rand(4, 24) + 0.5
    s = fn(tokens4, 24, Context.build(tokens4, {"sizes": sizes})).validate()
    assert torch.equal(s.apply(tokens4, weights=sizes), tokens4)
    out, _ = vtok.compress(tokens4, method, keep=1.0)
    assert torch.equal(out, tokens4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [1, 2, 5, 12, 13, 23, 0.25])
def test_exact_budget_sorted_unique(method, keep, tokens4):
    out, sel = vtok.compress(tokens4, method, keep=keep)
    k = vtok.resolve_k(keep, 24)
    assert out.shape == (4, k, 8) and sel.keep.shape == (4, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    if method in MERGING:
        _check_merge_selection(sel, 24)
        for b in range(4):
            for j in range(k):
                assert torch.allclose(out[b, j], tokens4[b, sel.output_of_each_token()[b] == j].mean(0), atol=1e-5)
    else:
        assert sel.assign is None
        for b in range(4):
            assert torch.equal(out[b], tokens4[b, sel.keep[b]])


@pytest.mark.parametrize("method", METHODS)
def test_batch_matches_one_by_one_and_deterministic(method, tokens4):
    out, sel = vtok.compress(tokens4, method, keep=6)
    out2, sel2 = vtok.compress(tokens4, method, keep=6)
    assert torch.equal(out, out2) and torch.equal(sel.keep, sel2.keep)
    for b in range(4):
        single, s = vtok.compress(tokens4[b:b + 1], method, keep=6)
        assert torch.equal(s.keep, sel.keep[b:b + 1])
        if sel.assign is not None:
            assert torch.equal(s.assign, sel.assign[b:b + 1])
        assert torch.allclose(single, out[b:b + 1], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("order", ["tome", "position"])
def test_tome_matches_naive_loops(seed, order):
    g = torch.Generator().manual_seed(seed)
    b, n = 3, 21
    x = torch.randn(b, n, 6, generator=g)
    keys = torch.randn(b, 2, n, 4, generator=g)
    sizes = torch.rand(b, n, generator=g) + 0.5
    cases = [(k, {}, 0) for k in (1, 5, 11, 15, 20)]  # k < ceil(N/2) needs several bipartite steps
    cases += [(9, {"keys": keys}, 0), (4, {"keys": keys[:, 0], "sizes": sizes}, 1), (12, {"sizes": sizes}, 3)]
    for k, ctx, protect in cases:
        out, sel = vtok.compress(x, "tome", keep=k, protect_first=protect, order=order, **ctx)
        for i in range(b):
            feats = None
            if "keys" in ctx:
                kk = ctx["keys"][i]
                feats = kk.mean(0) if kk.dim() == 3 else kk
            sz = ctx["sizes"][i] if "sizes" in ctx else None
            keep, assign, ref, size = _naive_tome(x[i], k, feats, sz, protect, order)
            assert sel.emitted_keep()[i].tolist() == keep, (k, ctx.keys(), protect)
            assert sel.output_of_each_token()[i].tolist() == assign
            assert torch.allclose(out[i], ref.float(), atol=1e-5)
            assert torch.allclose(sel.token_sizes()[i], torch.tensor(size, dtype=torch.float32), atol=1e-5)
            assert order == "tome" or sel.order is None


def _separated_blobs(seed, b=3, n=60, c=4, d=5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, c, d, generator=g) * 10
    labels = torch.randint(0, c, (b, n), generator=g)
    return centres.gather(1, labels[..., None].expand(b, n, d)) + 0.3 * torch.randn(b, n, d, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_matches_sklearn(seed):
    for x, k in ((_separated_blobs(seed), 4), (_separated_blobs(seed + 10), 6), (torch.randn(3, 40, 3,
                 generator=torch.Generator().manual_seed(seed)), 5)):
        b = x.shape[0]
        out, sel = vtok.compress(x, "kmeans", keep=k, seed=seed, iters=50)
        init = kmeans_pp_init(x, k, seed)
        for i in range(b):
            xi = x[i].double().numpy()
            km = KMeans(n_clusters=k, init=xi[init[i].numpy()], n_init=1, algorithm="lloyd", max_iter=50,
                        tol=0.0).fit(xi)
            assert _partition(sel.assign[i].tolist()) == _partition(km.labels_.tolist())
            slot_of = {int(lab): int(sel.assign[i, j]) for j, lab in enumerate(km.labels_)}
            ref = np.stack([km.cluster_centers_[lab] for lab in sorted(slot_of, key=slot_of.get)])
            assert np.allclose(out[i].numpy(), ref, atol=1e-4)


def test_kmeans_seed_changes_init_and_handles_duplicates():
    x = _separated_blobs(7, b=1, n=50, c=8)
    assert not torch.equal(kmeans_pp_init(x, 8, 0), kmeans_pp_init(x, 8, 1))
    # only 2 distinct points but k=4: every cluster still gets a member, exact budget, unique keep
    x = torch.tensor([[0.0, 0], [5, 5], [0, 0], [5, 5], [0, 0], [5, 5]])[None]
    out, sel = vtok.compress(x, "kmeans", keep=4)
    _check_merge_selection(sel, 6)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert torch.equal(out[0], x[0, sel.keep[0]])


def test_duplicates_all_methods():
    x = torch.ones(2, 10, 4)
    for method in METHODS:
        _, sel = vtok.compress(x, method, keep=6)
        assert sel.keep.shape == (2, 6) and (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
        if sel.assign is not None:
            _check_merge_selection(sel, 10)


# ----------------------------------------------------------------------------------------------- errors


def test_errors(tokens4):
    with pytest.raises(ValueError, match="protect_first"):
        vtok.compress(tokens4, "tome", keep=4, protect_first=-1)
    with pytest.raises(ValueError, match="protect_first must be < k"):
        vtok.compress(tokens4, "tome", keep=4, protect_first=4)
    with pytest.raises(ValueError, match="protect_first"):
        vtok.compress(tokens4, "tome", keep=4, protect_first=1.5)
    with pytest.raises(ValueError, match="keys"):
        vtok.compress(tokens4, "tome", keep=4, keys=torch.randn(4, 23, 8))
    with pytest.raises(ValueError, match="sizes"):
        vtok.compress(tokens4, "tome", keep=4, sizes=torch.zeros(4, 24))
    with pytest.raises(ValueError, match="seed"):
        vtok.compress(tokens4, "kmeans", keep=4, seed=-1)
    with pytest.raises(ValueError, match="iters"):
        vtok.compress(tokens4, "kmeans", keep=4, iters=0)
    with pytest.raises(ValueError, match="metric"):
        vtok.compress(tokens4, "kmedoids", keep=4, metric="manhattan")
    with pytest.raises(ValueError, match="iters"):
        vtok.compress(tokens4, "kmedoids", keep=4, iters=True)
    with pytest.raises(ValueError, match="knn"):
        vtok.compress(tokens4, "dpc_knn", keep=4, knn=0)
    with pytest.raises(TypeError, match="unknown option"):
        vtok.compress(tokens4, "dpc_knn", keep=4, k=3)


# ------------------------------------------------------------------------------------------- properties


@examples(40)
@given(n=st.integers(1, 40), b=st.integers(1, 3), r=st.floats(0.01, 1.0), method=st.sampled_from(METHODS),
       seed=st.integers(0, 2**16))
def test_property_shapes_and_budget(n, b, r, method, seed):
    x = torch.randn(b, n, 3, generator=torch.Generator().manual_seed(seed))
    out, sel = vtok.compress(x, method, keep=r)
    k = vtok.resolve_k(r, n)
    assert out.shape == (b, k, 3) and sel.keep.shape == (b, k)
    assert (sel.keep[:, 1:] > sel.keep[:, :-1]).all()
    assert ((sel.keep >= 0) & (sel.keep < n)).all()
    if sel.assign is not None and k < n:
        _check_merge_selection(sel, n)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["tome", "kmeans", "kmedoids", "dpc_knn"])
def test_no_nxn_allocation(method, monkeypatch):
    # k-means++, k-medoids and DPC-kNN build one N × N matrix only up to reference.GRAM_MAX_ELEMENTS (lowered here
    # below one sample's); above it they stream. ToMe never builds one.
    b, n = 1, 1024 if method == "tome" else 2048  # the streaming passes hold one 256 × N block
    monkeypatch.setattr(R, "GRAM_MAX_ELEMENTS", n * n - 1)
    x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(0))
    opts = {"keys": torch.randn(b, 2, n, 8)} if method == "tome" else {"iters": 3}
    opts = {} if method == "dpc_knn" else opts
    keep = 200 if method == "tome" else 32  # tome: three bipartite steps (1024 -> 512 -> 256 -> 200)
    peak = max_alloc_bytes(lambda: vtok.compress(x, method, keep=keep, **opts))
    assert peak < nxn_bytes(b, n) / 4


@pytest.mark.parametrize("method", ["kmeans", "kmedoids", "dpc_knn"])
def test_at_most_one_nxn_matrix_below_the_limit(method):
    b, n = 3, 600
    x = torch.randn(b, n, 16, generator=torch.Generator().manual_seed(0))
    peak = max_alloc_bytes(lambda: vtok.compress(x, method, keep=32))
    assert peak <= nxn_bytes(b, n) and b * n * n <= R.GRAM_MAX_ELEMENTS
