"""Helpers shared by the attention-score strategies (``cls_attn``, ``fopru``, ``hiprune``, ``visionzip``,
``zero_tprune``, ``fastervlm``, ``vispruner``, ``prumerge`` / ``prumerge_plus``).

These strategies rank tokens by attention the hook has already reduced to per-token scores (``cls_attn``,
``mid_attn``, ``text_attn``); only Zero-TPrune reads the full ``N × N`` graph (``attn``), because its PageRank needs
it. Per-head inputs are averaged over heads. Ties go to the lowest token index (``ops.stable_topk``; the authors use
``torch.topk`` / ``argsort``, whose tie order is unspecified), and every strategy returns the identity at ``k == N``.
Where the authors' public code and the paper text differ, vtok follows the code by default and the docstrings say
where.

Shapes: ``B`` batch, ``N`` tokens, ``D`` features, ``H`` heads, ``T`` query rows, ``Dk`` key features, ``(h, w)``
patch grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels.reference import acc
from vtok.pruners.registry import Placement

# The feature layer of LLaVA (CLIP's penultimate block output), where the encoder-side [CLS]-attention methods for
# VLMs (issue #19: fastervlm, vispruner, prumerge, prumerge_plus) read [CLS] attention, before the LLM, on the patch
# features the projector receives.
FEATURE_LAYER = Placement(layer=-2, at="output", prop_attn=False)


def head_mean(x: Tensor) -> Tensor:
    """``[B, N]`` or per head ``[B, H, N]`` → ``[B, N]`` fp32 (fp64 for fp64 input; mean over heads)."""
    x = acc(x)
    return x.mean(1) if x.dim() == 3 else x


def match_features(tokens: Tensor, ctx: Context) -> Tensor:
    """Matching features ``[B, N, F]``: ``keys`` if given (per head ``[B, H, N, dh]`` averaged over heads, as
    ToMe and VisionZip do), else the tokens themselves."""
    keys = ctx.get("keys")
    if keys is None:
        return tokens
    return acc(keys).mean(1) if keys.dim() == 4 else keys


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest int, halves up (``floor(x + 0.5)``)."""
    return int(math.floor(x + 0.5))


def rank_order(scores: Tensor) -> Tensor:
    """``[B, N]`` indices by descending score, ties → lowest index."""
    return torch.sort(acc(scores), dim=1, descending=True, stable=True).indices


def remaining(mask: Tensor, count: int) -> Tensor:
    """Indices ``[B, count]`` of the ``False`` positions of ``mask [B, N]`` in original order (each row must
    have exactly ``count`` of them)."""
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, :count]
