"""EVS: Efficient Video Sampling (Bagrov et al., "Efficient Video Sampling: Pruning Temporally Redundant Tokens for
Faster VLM Inference", arXiv 2510.14624), as vLLM / SGLang run it on a video's merged vision tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels.reference import acc
from vtok.pruners._video import frame_layout
from vtok.pruners.registry import register
from vtok.selection import Selection

EVS = "EVS: Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference (arXiv 2510.14624)"


@register("evs", family="temporal", needs=("frames",), uses=("grid",), paper=EVS)
def evs_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Drop the tokens that barely changed since the previous frame (Sec. 3).

    ``tokens [B, T·P, D]`` (``frames=T``): each token of frame ``t ≥ 1`` scores its dissimilarity
    ``1 − cos(x[t, i], x[t − 1, i])`` to the same position one frame earlier; every token of frame 0 scores 255
    (always first); the ``k`` highest scores are kept (ties → lower index, the serving code's stable descending
    sort). The serving code never keeps less than one frame (its count is ``max(P, int(T·P·(1 − q)))``); vtok
    keeps exactly ``k``, so a budget under ``P`` keeps the first ``k`` tokens of frame 0. Returns ``keep [B, k]``.
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    x = acc(tokens.detach()).reshape(b, t, p, -1)
    score = torch.full((b, t, p), 255.0, device=tokens.device, dtype=x.dtype)
    if t > 1:
        score[:, 1:] = 1.0 - F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
    order = torch.sort(score.reshape(b, n), dim=1, descending=True, stable=True).indices
    return Selection.from_indices(order[:, :k], n)
