"""Ordered tokens ``prefix``: the first ``k`` tokens of an ordered 1D sequence.

FlexTok (Bachmann et al. 2025, arXiv 2502.13967, §3.2 "nested dropout") and One-D-Piece (Miwa et al. 2025, arXiv
2501.10064, §3.2 "tail token drop") train 1D tokenizers so that any prefix of their tokens decodes to the whole
image: a token budget becomes a prefix length. This is the strategy that reads such tokens (``vtok.tokenizers_img``);
on tokens without an order (ViT patches) it is only "keep the first k in raster order".
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.pruners._checks import check_k
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("prefix", family="ordered",
          paper="FlexTok (2502.13967) §3.2 nested dropout / One-D-Piece (2501.10064) §3.2 tail drop: a budget is a "
                "prefix")
def prefix(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep the first ``k`` of the ``N`` ordered tokens ``[B, N, D]`` (exact; the identity at ``k = N``)."""
    b, n = tokens.shape[:2]
    check_k(k, n)
    return Selection(torch.arange(k, device=tokens.device).expand(b, k).contiguous(), n)
