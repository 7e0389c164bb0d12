"""Encoder-side [CLS]-attention methods for VLMs (issue #19): FasterVLM, VisPruner, LLaVA-PruMerge / PruMerge+.

All three read the vision encoder's [CLS] attention at the feature layer (``cls_attn``, ``[B, N]`` or per head
``[B, H, N]``, head-averaged as the authors' code does) and run before the LLM, on the patch features the
projector receives. Where the authors' public code and the paper text differ, vtok follows the code by default and
the docstrings say where. Ties go to the lowest token index (the authors use ``torch.topk`` / ``argsort``, whose
tie order is unspecified). Every strategy returns the identity at ``k == N``.

Shapes: ``B`` batch, ``N`` tokens, ``D`` features, ``H`` heads, ``Dk`` key features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.pruners.attention import _acc, _check_fraction, _check_k, _rank_order, _scores
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection, gather_tokens

# The feature layer of LLaVA (CLIP's penultimate block output), where these methods read [CLS] attention.
_FEATURE_LAYER = Placement(layer=-2, at="output", prop_attn=False)


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# FasterVLM
# ---------------------------------------------------------------------------------------------------------------

@register("fastervlm", family="attention", needs=("cls_attn",), placement=_FEATURE_LAYER,
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
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(_scores(ctx["cls_attn"]), k), n)


# ---------------------------------------------------------------------------------------------------------------
# VisPruner
# ---------------------------------------------------------------------------------------------------------------

def vispruner_diverse(xn: Tensor, residual: Tensor, count: int, per_step: int = 8) -> Tensor:
    """VisPruner's duplicate removal: shrink ``residual [B, R]`` (token indices) to ``[B, count]`` diverse ones.

    ``xn [B, N, D]``: L2-normalised features. Each round splits the current residual list alternately
    (``a`` = even positions, ``b`` = odd positions), scores every ``a`` token by its highest cosine similarity to
    ``b`` and drops the ``r = min(per_step, R − count, |a|)`` most similar ``a`` tokens; the new list is
    ``[kept a in descending similarity, b]`` (the authors' order, which the next round's split depends on).
    Ties: among equally similar ``a`` tokens the earlier one in the list is dropped first.
    """
    while residual.shape[1] > count:
        r_len = residual.shape[1]
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        r = min(per_step, r_len - count, a_idx.shape[1])
        sim = torch.bmm(gather_tokens(xn, a_idx), gather_tokens(xn, b_idx).transpose(1, 2)).amax(-1)  # [B, |a|]
        keep_a = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([a_idx.gather(1, keep_a), b_idx], 1)
    return residual


@register("vispruner", family="attention", needs=("cls_attn",), placement=_FEATURE_LAYER,
          paper="VisPruner: Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs "
                "(ICCV 2025; arXiv 2412.01818 v2+, the revised FasterVLM paper)")
def vispruner_select(tokens: Tensor, k: int, ctx: Context, *, important_ratio: float = 0.5,
                     per_step: int = 8) -> Selection:
    """VisPruner: important tokens by [CLS] attention plus diverse tokens left after removing near-duplicates.

    Paper Sec. 4 (method): ``k_imp = floor(important_ratio · k)`` *important* tokens are the top of the
    head-averaged ``cls_attn`` (``[B, N]`` / ``[B, H, N]``); the other ``N − k_imp`` tokens, in descending attention
    order, are thinned to ``k − k_imp`` *diverse* tokens by repeated similarity-based duplicate removal
    (:func:`vispruner_diverse`: alternate split, drop the ``per_step`` tokens most cosine-similar to the other
    half, repeat), on the tokens themselves (the feature-layer outputs, as the authors' code does).

    Options (the authors' code defaults): ``important_ratio`` in ``[0, 1]`` (``0.5``; ``floor`` as in their
    ``int(T · r)``), ``per_step`` ≥ 1 tokens removed per round (``8``). Differences from the authors' code: a round
    never removes more than the ``a`` half holds (their code breaks there for tiny residual lists) and odd-length
    lists are split ``ceil`` / ``floor`` (their code needs an even length). Returns ``keep [B, k]`` ascending.
    """
    b, n = tokens.shape[:2]
    important_ratio = _check_fraction("important_ratio", important_ratio)
    per_step = _check_int("per_step", per_step, 1)
    _check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    n_imp = min(int(k * important_ratio), k)
    order = _rank_order(_scores(ctx["cls_attn"]))  # [B, N] descending attention, ties → lowest index
    if n_imp == k:
        return Selection.from_indices(order[:, :k], n)
    xn = F.normalize(_acc(tokens), dim=-1)
    diverse = vispruner_diverse(xn, order[:, n_imp:], k - n_imp, per_step)
    return Selection.from_indices(torch.cat([order[:, :n_imp], diverse], 1), n)
