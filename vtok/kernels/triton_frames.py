"""Per-frame reductions for video tokens: per-frame mean and same-position cosine similarity to the
previous frame, in one pass over ``x [B, T*P, D]``."""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.kernels._triton import next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _segment_stats_kernel(x_ptr, mean_ptr, sim_ptr, T, P, D, sxb, sxn, inv_p,
                              BP: tl.constexpr, BD: tl.constexpr):
        b = tl.program_id(0)
        t = tl.program_id(1)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        pm = offs_p < P
        dot = tl.zeros([BP], tl.float32)
        n1 = tl.zeros([BP], tl.float32)
        n2 = tl.zeros([BP], tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            msk = pm[:, None] & (offs_d[None, :] < D)
            cur = tl.load(x_ptr + b * sxb + (t * P + offs_p[:, None]) * sxn + offs_d[None, :], mask=msk,
                          other=0.0).to(tl.float32)
            tl.atomic_add(mean_ptr + (b * T + t) * D + offs_d, tl.sum(cur, 0) * inv_p, mask=offs_d < D)
            if t > 0:
                prv = tl.load(x_ptr + b * sxb + ((t - 1) * P + offs_p[:, None]) * sxn + offs_d[None, :], mask=msk,
                              other=0.0).to(tl.float32)
                dot += tl.sum(cur * prv, 1)
                n1 += tl.sum(cur * cur, 1)
                n2 += tl.sum(prv * prv, 1)
        sim = dot / (tl.maximum(tl.sqrt(n1), 1e-12) * tl.maximum(tl.sqrt(n2), 1e-12))
        tl.store(sim_ptr + (b * T + t) * P + offs_p, sim, mask=pm)


def segment_stats_triton(x: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """Triton version of ``reference.segment_stats``: ``(mean [B, T, D], sim_prev [B, T, P])`` fp32."""
    b, n, d = x.shape
    p = n // frames
    x = x if x.stride(-1) == 1 else x.contiguous()
    mean = torch.zeros(b, frames, d, device=x.device, dtype=torch.float32)
    sim = torch.empty(b, frames, p, device=x.device, dtype=torch.float32)
    bp = min(128, next_pow2(p))
    bd = max(16, min(128, 8192 // bp))
    _segment_stats_kernel[(b, frames, triton.cdiv(p, bp))](x, mean, sim, frames, p, d, x.stride(0), x.stride(1),
                                                           1.0 / p, BP=bp, BD=bd)
    return mean, sim
