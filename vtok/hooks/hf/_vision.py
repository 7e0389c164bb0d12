"""Vision-side context for the pre-LLM stage, recomputed cheaply from one encoder layer's input.

For CLIP / SigLIP-style layers (``layer_norm1``, ``self_attn.{q_proj, k_proj, num_heads, head_dim, scale}``): the
layer's queries and keys are recomputed from the hidden state it received (captured by a forward pre-hook, so the
tower keeps running SDPA), and from them

* ``cls_attn [n_img, N]``: the CLS query's softmax row over the patch tokens, heads averaged (towers with a CLS
  token), or the attention each token receives, averaged over heads and all query rows (towers without one);
* ``keys [n_img, H, N, dh]``: that layer's per-head keys of the patch tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 256  # query rows per block for the mean received attention (bounds the [H, rows, T] block)


def qk(layer: torch.nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(q, k, scale)`` with ``q, k [n, H, T, dh]`` of a CLIP / SigLIP encoder layer for its input ``hidden``."""
    attn = layer.self_attn
    y = layer.layer_norm1(hidden)
    n, t, _ = y.shape
    h = attn.num_heads
    q = attn.q_proj(y).view(n, t, h, -1).transpose(1, 2)
    k = attn.k_proj(y).view(n, t, h, -1).transpose(1, 2)
    scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
    return q, k, scale


def cls_row(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Softmax row of query 0 over all ``T`` tokens, heads averaged: ``[n, T]`` (fp32)."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale
    return logits.softmax(-1).mean(1)[:, 0]


def received(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Attention each token receives, averaged over heads and all query rows: ``[n, T]`` (fp32), in row blocks."""
    n, h, t, _ = q.shape
    acc = torch.zeros(n, t, dtype=torch.float32, device=q.device)
    kf = k.float().transpose(-1, -2)
    for i in range(0, t, _CHUNK):
        acc += ((q[:, :, i:i + _CHUNK].float() @ kf) * scale).softmax(-1).sum((1, 2))
    return acc / (h * t)
