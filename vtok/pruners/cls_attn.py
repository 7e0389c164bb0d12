"""CLS-attention top-k: the tokens that receive the most attention from the [CLS] query (EViT's rule, and
VisionZip's dominant tokens).
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._attention import head_mean
from vtok.pruners._checks import check_k
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("cls_attn", family="attention", needs=("cls_attn",),
          paper="CLS-attention top-k (as in EViT, arXiv 2202.07800, and the dominant tokens of VisionZip)")
def cls_attn_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Keep the ``k`` tokens that receive the most attention from the CLS query.

    ``cls_attn``: ``[B, N]`` or per head ``[B, H, N]`` (averaged over heads). Returns ``keep [B, k]`` in
    original order; ties → lowest index.
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(head_mean(ctx["cls_attn"]), k), n)
