"""FasterVLM (arXiv 2412.01818 v1): the patch tokens with the highest [CLS] attention at the vision encoder's
feature layer.
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners._attention import FEATURE_LAYER, head_mean
from vtok.pruners._checks import check_k
from vtok.pruners.registry import register
from vtok.selection import Selection


@register("fastervlm", family="attention", needs=("cls_attn",), placement=FEATURE_LAYER,
          paper="FasterVLM: [CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM "
                "Inference Faster (arXiv 2412.01818 v1)")
def fastervlm_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """FasterVLM: keep the ``k`` patch tokens with the highest [CLS] attention at the encoder's feature layer.

    Paper Sec. 3 (the [CLS] attention ``softmax(q_cls K^T / sqrt(d))`` of the layer whose output LLaVA feeds the
    projector, averaged over heads, ranks the patch tokens; the top ones are kept before the projector). The
    authors' code reads ``attentions[select_layer]`` (layer −2), row 0 (CLS), patch columns, mean over heads, then
    ``topk`` and an index mask, so the kept tokens stay in original order — as here. ``tokens [B, N, D]``,
    ``cls_attn`` ``[B, N]`` / ``[B, H, N]``. The ranking is the same as ``cls_attn``'s; ``fastervlm`` differs in its
    default placement (the feature layer's output, layer −2, as in the paper).
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(head_mean(ctx["cls_attn"]), k), n)
