"""Selection kernels: greedy k-center in one launch per batch, and top-k + gather."""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.kernels._triton import next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _kcenter_kernel(x_ptr, rn_ptr, sq_ptr, start_ptr, out_ptr, mind_ptr, N, D, K, sxb, sxn,
                        COSINE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """One program per sample: K sequential farthest-point steps, min-distances kept in ``mind`` [B, N]."""
        b = tl.program_id(0)
        cur = tl.load(start_ptr + b)
        tl.store(out_ptr + b * K, cur)
        for t in range(1, K + 1):
            best = float("-inf")
            besti = 0
            rc = tl.load(rn_ptr + b * N + cur)
            sc = tl.load(sq_ptr + b * N + cur)
            for n0 in range(0, N, BN):
                offs_n = n0 + tl.arange(0, BN)
                dot = tl.zeros([BN], tl.float32)
                for d0 in range(0, D, BD):
                    offs_d = d0 + tl.arange(0, BD)
                    xc = tl.load(x_ptr + b * sxb + cur * sxn + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
                    xt = tl.load(x_ptr + b * sxb + offs_n[:, None] * sxn + offs_d[None, :],
                                 mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
                    dot += tl.sum(xt * xc[None, :], 1)
                if COSINE:
                    rn = tl.load(rn_ptr + b * N + offs_n, mask=offs_n < N, other=0.0)
                    dist = 1.0 - dot * rn * rc
                else:
                    sq = tl.load(sq_ptr + b * N + offs_n, mask=offs_n < N, other=0.0)
                    dist = tl.maximum(sq + sc - 2.0 * dot, 0.0)
                if t == 1:
                    m = dist
                else:
                    m = tl.load(mind_ptr + b * N + offs_n, mask=offs_n < N, other=float("-inf"))
                    m = tl.minimum(m, dist)
                m = tl.where((offs_n == cur) | (offs_n >= N), float("-inf"), m)
                tl.store(mind_ptr + b * N + offs_n, m, mask=offs_n < N)
                bmax = tl.max(m, 0)
                barg = tl.argmax(m, 0) + n0
                upd = bmax > best
                besti = tl.where(upd, barg, besti)
                best = tl.where(upd, bmax, best)
            tl.debug_barrier()
            if t < K:
                cur = besti.to(tl.int64)
                tl.store(out_ptr + b * K + t, cur)
                # mark the new centre as chosen for the next pass
                tl.store(mind_ptr + b * N + cur, float("-inf"))
                tl.debug_barrier()

    @triton.jit
    def _topk_index_kernel(s_ptr, out_ptr, N, K, ssb, BN: tl.constexpr):
        """One program per sample: the K largest scores (ties → lower index), written in ascending index order."""
        b = tl.program_id(0)
        offs = tl.arange(0, BN)
        s = tl.load(s_ptr + b * ssb + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
        bits = s.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving int for floats
        packed = (key.to(tl.int64) << 32) | (N - 1 - offs).to(tl.int64)
        packed = tl.where(offs < N, packed, -9223372036854775807 - 1)
        srt = tl.sort(packed, 0, descending=True)
        kth = tl.sum(tl.where(offs == K - 1, srt, 0), 0)
        keep = (packed >= kth) & (offs < N)
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out_ptr + b * K + pos, offs.to(tl.int64), mask=keep)

    @triton.jit
    def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, K, D, sxb, sxn, sob, son,
                            BK: tl.constexpr, BD: tl.constexpr):
        b = tl.program_id(0)
        offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
        offs_d = tl.program_id(2) * BD + tl.arange(0, BD)
        rows = tl.load(idx_ptr + b * K + offs_k, mask=offs_k < K, other=0)
        msk = (offs_k[:, None] < K) & (offs_d[None, :] < D)
        v = tl.load(x_ptr + b * sxb + rows[:, None] * sxn + offs_d[None, :], mask=msk)
        tl.store(out_ptr + b * sob + offs_k[:, None] * son + offs_d[None, :], v, mask=msk)


def farthest_point_triton(x: Tensor, k: int, start: Tensor | None = None, metric: str = "cosine") -> Tensor:
    """Triton version of ``reference.farthest_point`` (one launch for all ``k`` steps): ``[B, k]`` in pick order."""
    if metric not in ("cosine", "euclidean", "sqeuclidean"):
        raise ValueError(f"metric must be 'cosine', 'euclidean' or 'sqeuclidean', got {metric!r}")
    b, n, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    xf = x.float()
    sq = xf.pow(2).sum(-1).contiguous()
    rn = (1.0 / sq.sqrt().clamp_min(1e-12)).contiguous()
    if start is None:
        start = torch.zeros(b, dtype=torch.long, device=x.device)
    out = torch.empty(b, k, dtype=torch.long, device=x.device)
    mind = torch.empty(b, n, dtype=torch.float32, device=x.device)
    bn = min(1024, next_pow2(n))
    bd = max(16, min(64, 8192 // bn))
    _kcenter_kernel[(b,)](x, rn, sq, start.to(torch.long).contiguous(), out, mind, n, d, k, x.stride(0), x.stride(1),
                          COSINE=metric == "cosine", BN=bn, BD=bd)
    return out


def stable_topk_triton(scores: Tensor, k: int) -> Tensor:
    """Triton version of ``reference.stable_topk``: ``[B, k]`` indices, ascending (ties → lower index)."""
    b, n = scores.shape
    scores = scores if scores.stride(-1) == 1 else scores.contiguous()
    out = torch.empty(b, k, dtype=torch.long, device=scores.device)
    _topk_index_kernel[(b,)](scores, out, n, k, scores.stride(0), BN=next_pow2(n))
    return out


def topk_gather_triton(x: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.topk_gather``: ``(idx [B, k], x_kept [B, k, D])``."""
    idx = stable_topk_triton(scores, k)
    b, _, d = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(b, k, d, dtype=x.dtype, device=x.device)
    bk, bd = 16, min(256, next_pow2(d))
    _gather_rows_kernel[(b, triton.cdiv(k, bk), triton.cdiv(d, bd))](
        x, idx, out, k, d, x.stride(0), x.stride(1), out.stride(0), out.stride(1), BK=bk, BD=bd)
    return idx, out
