"""Fused best-match between two token sets, tiled, no similarity matrix in memory.

One kernel serves two ops: for each row ``a_i`` it finds ``argmax_j (a_i · b_j) · ra_i · rb_j + c_j``.
* cosine matching (ToMe): ``ra = 1/‖a_i‖``, ``rb = 1/‖b_j‖``, ``c = 0`` → best cosine similarity;
* k-means assignment: ``ra = 1``, ``rb = 2``, ``c = −‖b_j‖²`` → nearest centroid, ``dist = ‖a_i‖² − best``.
Ties go to the lowest ``j``, as in the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.kernels._triton import dot_dtype_upcast, next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _best_match_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, c_ptr, best_ptr, idx_ptr,
                           NA, NB, D, sab, san, sbb, sbn,
                           UPCAST: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        bb = tl.program_id(1)
        offs_a = pid * BA + tl.arange(0, BA)
        ra = tl.load(ra_ptr + bb * NA + offs_a, mask=offs_a < NA, other=0.0)
        best = tl.full([BA], float("-inf"), tl.float32)
        besti = tl.zeros([BA], tl.int32)
        for n0 in range(0, NB, BB):
            offs_b = n0 + tl.arange(0, BB)
            acc = tl.zeros([BA, BB], tl.float32)
            for d0 in range(0, D, BD):
                offs_d = d0 + tl.arange(0, BD)
                a = tl.load(a_ptr + bb * sab + offs_a[:, None] * san + offs_d[None, :],
                            mask=(offs_a[:, None] < NA) & (offs_d[None, :] < D), other=0.0)
                bt = tl.load(b_ptr + bb * sbb + offs_b[None, :] * sbn + offs_d[:, None],
                             mask=(offs_b[None, :] < NB) & (offs_d[:, None] < D), other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc += tl.dot(a, bt)
            rb = tl.load(rb_ptr + bb * NB + offs_b, mask=offs_b < NB, other=0.0)
            c = tl.load(c_ptr + bb * NB + offs_b, mask=offs_b < NB, other=0.0)
            s = acc * ra[:, None] * rb[None, :] + c[None, :]
            s = tl.where(offs_b[None, :] < NB, s, float("-inf"))
            bmax = tl.max(s, 1)
            barg = tl.argmax(s, 1).to(tl.int32) + n0
            upd = bmax > best
            best = tl.where(upd, bmax, best)
            besti = tl.where(upd, barg, besti)
        tl.store(best_ptr + bb * NA + offs_a, best, mask=offs_a < NA)
        tl.store(idx_ptr + bb * NA + offs_a, besti.to(tl.int64), mask=offs_a < NA)


def _best_match(a: Tensor, b: Tensor, ra: Tensor, rb: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    bsz, na, d = a.shape
    nb = b.shape[1]
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    best = torch.empty(bsz, na, device=a.device, dtype=torch.float32)
    idx = torch.empty(bsz, na, device=a.device, dtype=torch.int64)
    ba, bb_, bd = 32, 64, min(64, next_pow2(d))
    upcast = dot_dtype_upcast(a)
    _best_match_kernel[(triton.cdiv(na, ba), bsz)](
        a, b, ra.contiguous(), rb.contiguous(), c.contiguous(), best, idx, na, nb, d,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), UPCAST=upcast, BA=ba, BB=bb_, BD=bd)
    return best, idx


def cosine_argmax_triton(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.cosine_argmax``: ``a [B, Na, D]``, ``b [B, Nb, D]`` → ``(sim, idx) [B, Na]``."""
    ra = 1.0 / a.float().norm(dim=-1).clamp_min(1e-12)
    rb = 1.0 / b.float().norm(dim=-1).clamp_min(1e-12)
    return _best_match(a, b, ra, rb, torch.zeros_like(rb))


def kmeans_assign_triton(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.kmeans_assign``: nearest centroid (squared Euclidean) → ``(assign, dist)``."""
    ones = torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
    cn = centroids.float().pow(2).sum(-1)
    best, idx = _best_match(x, centroids, ones, torch.full_like(cn, 2.0), -cn)
    dist = (x.float().pow(2).sum(-1) - best).clamp_min(0.0)
    return idx, dist
