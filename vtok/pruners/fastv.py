"""FastV (arXiv 2403.06764): after LLM layer K, keep the image tokens that receive the most attention."""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_choice, check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


@register("fastv", family="attention", needs=("text_attn",), placement=Placement(positions="original"),
          paper="FastV: An Image is Worth 1/2 Tokens After Layer 2 (arXiv 2403.06764)")
def fastv_select(tokens: Tensor, k: int, ctx: Context, *, query_source: str = "last") -> Selection:
    """FastV (Sec. 4): after LLM layer K keep the ``k`` image tokens that receive the most attention.

    ``text_attn``: ``[B, N]`` (already reduced), ``[B, T, N]`` (one row per query token) or ``[B, H, T, N]``
    (heads averaged, as the paper does). ``query_source`` picks the query rows of a ``[B, T, N]`` /
    ``[B, H, T, N]`` input:

    * ``"last"``: the last row only — the official code's choice (the last prompt token's attention);
    * ``"all"`` / ``"text"``: the mean over all given rows (the paper's average attention received). They
      compute the same thing; they differ in what the hook passes: for ``"all"`` every query row after the
      image, for ``"text"`` only the instruction-token rows.

    (Named ``query_source`` rather than ``query`` because ``query`` is a context key.) Ties → lowest index.
    """
    b, n = tokens.shape[:2]
    check_choice("query_source", query_source, ("last", "text", "all"))
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    att = acc(ctx["text_attn"])
    if att.dim() == 4:
        att = att.mean(1)
    if att.dim() == 3:
        att = att[:, -1] if query_source == "last" else att.mean(1)
    return Selection(ops.stable_topk(att, k), n)
