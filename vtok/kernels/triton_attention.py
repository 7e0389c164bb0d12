"""Fused attention-received: ``Σ_m softmax(q_m kᵀ · scale)`` per key, from q and k, with no score matrix.

Two passes, both tiled (FlashAttention-style online softmax):
1. per query row: running max ``m`` and normaliser ``l = Σ_n exp(s_mn − m)`` over key tiles;
2. per key tile: ``Σ_m exp(s_mn − m_m) / l_m`` over query tiles.
Memory: ``O(B·H·M)`` for the row statistics, never ``M × N``. Matches ``reference.attention_received``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtok.kernels._triton import dot_dtype_upcast, next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _row_stats_kernel(q_ptr, k_ptr, kmask_ptr, qpos_ptr, kpos_ptr, m_ptr, l_ptr,
                          H, M, N, scale,
                          sqb, sqh, sqm, skb, skh, skn, smb,
                          HAS_KMASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DH: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=(offs_m[:, None] < M) & (offs_d[None, :] < DH), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if CAUSAL:
            qpos = tl.load(qpos_ptr + offs_m, mask=offs_m < M, other=0)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        for n0 in range(0, N, BN):
            offs_n = n0 + tl.arange(0, BN)
            kt = tl.load(k_ptr + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None],
                         mask=(offs_n[None, :] < N) & (offs_d[:, None] < DH), other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt) * scale
            valid = (offs_n[None, :] < N) & (offs_m[:, None] >= 0)
            if HAS_KMASK:
                km = tl.load(kmask_ptr + b * smb + offs_n, mask=offs_n < N, other=0)
                valid = valid & (km[None, :] != 0)
            if CAUSAL:
                kpos = tl.load(kpos_ptr + offs_n, mask=offs_n < N, other=0)
                valid = valid & (kpos[None, :] <= qpos[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = bh * M + offs_m
        tl.store(m_ptr + out, m_i, mask=offs_m < M)
        tl.store(l_ptr + out, l_i, mask=offs_m < M)

    @triton.jit
    def _col_sum_kernel(q_ptr, k_ptr, kmask_ptr, qpos_ptr, kpos_ptr, m_ptr, l_ptr, out_ptr,
                        H, M, N, scale,
                        sqb, sqh, sqm, skb, skh, skn, smb,
                        HAS_KMASK: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DH: tl.constexpr):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        kt = tl.load(k_ptr + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None],
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < DH), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        valid_n = offs_n < N
        if HAS_KMASK:
            km = tl.load(kmask_ptr + b * smb + offs_n, mask=offs_n < N, other=0)
            valid_n = valid_n & (km != 0)
        if CAUSAL:
            kpos = tl.load(kpos_ptr + offs_n, mask=offs_n < N, other=0)
        acc = tl.zeros([BN], tl.float32)
        for m0 in range(0, M, BM):
            offs_m = m0 + tl.arange(0, BM)
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                        mask=(offs_m[:, None] < M) & (offs_d[None, :] < DH), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            m_i = tl.load(m_ptr + bh * M + offs_m, mask=offs_m < M, other=float("-inf"))
            l_i = tl.load(l_ptr + bh * M + offs_m, mask=offs_m < M, other=1.0)
            s = tl.dot(q, kt) * scale
            valid = valid_n[None, :] & (offs_m[:, None] < M) & (m_i[:, None] > float("-inf"))
            if CAUSAL:
                qpos = tl.load(qpos_ptr + offs_m, mask=offs_m < M, other=0)
                valid = valid & (kpos[None, :] <= qpos[:, None])
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
            p = tl.where(valid, tl.exp(s - m_safe[:, None]) * inv_l[:, None], 0.0)
            acc += tl.sum(p, 0)
        tl.store(out_ptr + bh * N + offs_n, acc, mask=offs_n < N)


def attention_received_triton(q: Tensor, k: Tensor, scale: float | None = None, key_mask: Tensor | None = None,
                              q_pos: Tensor | None = None, k_pos: Tensor | None = None,
                              head_mean: bool = True) -> Tensor:
    """Triton version of ``reference.attention_received``: ``q [B, H, M, dh]``, ``k [B, H, N, dh]`` → fp32
    ``[B, N]`` (head mean) or ``[B, H, N]``."""
    b, h, m, dh = q.shape
    n = k.shape[2]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    q = q.contiguous() if q.stride(-1) != 1 else q
    k = k.contiguous() if k.stride(-1) != 1 else k
    upcast = dot_dtype_upcast(q)
    bd = next_pow2(dh)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = 64 if bd <= 64 else 32
    causal = q_pos is not None and k_pos is not None
    dummy = torch.zeros(1, device=q.device, dtype=torch.int64)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else dummy
    qp = q_pos.to(torch.int64).contiguous() if causal else dummy
    kp = k_pos.to(torch.int64).contiguous() if causal else dummy
    mstat = torch.empty(b * h * m, device=q.device, dtype=torch.float32)
    lstat = torch.empty_like(mstat)
    out = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               km.stride(0) if key_mask is not None else 0)
    meta = dict(HAS_KMASK=key_mask is not None, CAUSAL=causal, UPCAST=upcast, BM=bm, BN=bn, BD=bd, DH=dh)
    _row_stats_kernel[(triton.cdiv(m, bm), b * h)](q, k, km, qp, kp, mstat, lstat, h, m, n, scale, *strides, **meta)
    _col_sum_kernel[(triton.cdiv(n, bn), b * h)](q, k, km, qp, kp, mstat, lstat, out, h, m, n, scale, *strides,
                                                 **meta)
    return out.mean(1) if head_mean else out
