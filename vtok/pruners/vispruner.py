"""VisPruner (ICCV 2025; arXiv 2412.01818 v2+): important tokens by [CLS] attention plus diverse tokens left
after similarity-based duplicate removal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import reference as ref
from vtok.kernels.reference import acc
from vtok.pruners._attention import FEATURE_LAYER, head_mean, rank_order
from vtok.pruners._checks import check_fraction, check_int, check_k
from vtok.pruners.registry import register
from vtok.selection import Selection, gather_tokens


def vispruner_diverse(xn: Tensor, residual: Tensor, count: int, per_step: int = 8) -> Tensor:
    """VisPruner's duplicate removal: shrink ``residual [B, R]`` (token indices) to ``[B, count]`` diverse ones.

    ``xn [B, N, D]``: L2-normalised features. Each round splits the current residual list alternately
    (``a`` = even positions, ``b`` = odd positions), scores every ``a`` token by its highest cosine similarity to
    ``b`` and drops the ``r = min(per_step, R − count, |a|)`` most similar ``a`` tokens; the new list is
    ``[kept a in descending similarity, b]`` (the authors' order, which the next round's split depends on).
    Ties: among equally similar ``a`` tokens the earlier one in the list is dropped first. Where one sample's
    ``N × N`` matrix fits ``reference.GRAM_MAX_ELEMENTS``, its cosine matrix is computed once (one GEMM) and each
    round reads its ``|a| × |b|`` block; otherwise each round runs ``bmm`` over the batch in column blocks of
    ``reference.DEFAULT_CHUNK`` (memory ``O(B · |a| · chunk)``).
    """
    b, n = xn.shape[:2]
    if ref.gram_groups(1, n) is not None:  # per sample: one GEMM, then each round reads an |a| x |b| block
        out = []
        for i in range(b):
            gram, res = xn[i] @ xn[i].T, residual[i]
            while res.shape[0] > count:
                a_idx, b_idx = res[::2], res[1::2]
                r = min(per_step, res.shape[0] - count, a_idx.shape[0])
                sim = gram.index_select(0, b_idx).amax(0)[a_idx]  # symmetric: max over b rows, read at a
                keep_a = torch.sort(sim, descending=True, stable=True).indices[r:]
                res = torch.cat([a_idx[keep_a], b_idx])
            out.append(res)
        return torch.stack(out)
    chunk = ref.DEFAULT_CHUNK
    while residual.shape[1] > count:
        a_idx, b_idx = residual[:, ::2], residual[:, 1::2]
        r = min(per_step, residual.shape[1] - count, a_idx.shape[1])
        xa = gather_tokens(xn, a_idx)
        sim = torch.stack([torch.bmm(xa, gather_tokens(xn, b_idx[:, c:c + chunk]).transpose(1, 2)).amax(-1)
                           for c in range(0, b_idx.shape[1], chunk)]).amax(0)  # [B, |a|], O(B·|a|·chunk) memory
        keep_a = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([a_idx.gather(1, keep_a), b_idx], 1)
    return residual


@register("vispruner", family="attention", needs=("cls_attn",), placement=FEATURE_LAYER,
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
    important_ratio = check_fraction("important_ratio", important_ratio)
    per_step = check_int("per_step", per_step, 1)
    check_k(k, n)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    n_imp = min(int(k * important_ratio), k)
    order = rank_order(head_mean(ctx["cls_attn"]))  # [B, N] descending attention, ties → lowest index
    if n_imp == k:
        return Selection.from_indices(order[:, :k], n)
    xn = F.normalize(acc(tokens), dim=-1)
    diverse = vispruner_diverse(xn, order[:, n_imp:], k - n_imp, per_step)
    return Selection.from_indices(torch.cat([order[:, :n_imp], diverse], 1), n)
