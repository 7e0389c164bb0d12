"""DART: duplication-aware token reduction (Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", arXiv 2502.11494).

Instead of scoring importance, DART picks a few *pivot* tokens and keeps, for each pivot, the image tokens least
similar to it (the duplicates of a pivot are what it drops). In the authors' LLaVA / Qwen2-VL code the reduction runs
before LLM layer ``K = 2``: pivots are the 4 image tokens and the 4 instruction tokens (after the image) with the
largest L1 norm of their layer-``K − 1`` attention keys (all heads), and similarity is the cosine of the hidden states
entering layer ``K`` after the LLM's final norm. ``vtok.wrap`` supplies exactly that context (``keys``,
``features``, ``text_keys``, ``text_features``); on plain tensors the tokens themselves are the features and only
image pivots exist unless ``text_*`` is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners.clustering import _check_int
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


def _ranked(scores: Tensor, k: int) -> Tensor:
    """``[B, k]`` indices of the ``k`` largest ``scores [B, N]`` in descending order, ties → lower index first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _l1(keys: Tensor) -> Tensor:
    """``[B, N]`` L1 norm of each token's key over all heads: ``keys [B, N, Dk]`` or ``[B, H, N, dh]``."""
    k = acc(keys)
    return k.abs().sum(-1) if k.dim() == 3 else k.abs().sum((1, 3))


@register("dart", family="diversity", needs=("keys",), uses=("features", "text_features", "text_keys"),
          placement=Placement(positions="original"),
          paper="DART: Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
                "(arXiv 2502.11494)")
def dart_select(tokens: Tensor, k: int, ctx: Context, *, pivot_image: int = 4, pivot_text: int = 4) -> Selection:
    """DART (Sec. 3, Eq. 4–6): keep the pivots' least-duplicated tokens.

    ``tokens [B, N, D]``; ``keys`` of the same tokens pick the ``pivot_image`` image pivots (largest key L1 norm,
    kept); ``text_keys`` / ``text_features`` (``[B, T, ·]``) the ``pivot_text`` instruction pivots (not kept: they are
    not image tokens). Each pivot in turn — image pivots first, each group by descending key norm — takes its quota
    of the not-yet-kept image tokens with the *lowest* cosine similarity to it, on ``features`` (default: the tokens).
    Quotas split ``k − #image pivots`` as evenly as possible (earlier pivots take the remainder). Ties → lowest index.

    Differences from the authors' code, which exist to keep vtok's exact budget: there every pivot takes
    ``(keep) // #pivots`` tokens and the image pivots come on top (e.g. 132 tokens for a budget of 128), and the
    pivots are visited in Python ``set`` order. Defaults: 4 + 4 pivots (their scripts). Returns ``keep [B, k]``.
    """
    b, n = tokens.shape[:2]
    pivot_image, pivot_text = _check_int("pivot_image", pivot_image, 0), _check_int("pivot_text", pivot_text, 0)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    has_text = "text_features" in ctx and "text_keys" in ctx
    if ("text_features" in ctx) != ("text_keys" in ctx):
        raise ValueError("dart: pass both 'text_features' and 'text_keys' (the instruction pivots), or neither")
    feats = F.normalize(acc(ctx.get("features", tokens)), dim=-1)  # [B, N, Df]
    p_img = min(pivot_image, k)
    img_piv = _ranked(_l1(ctx["keys"]), p_img) if p_img else None  # [B, p] by descending norm
    piv_vecs = [] if img_piv is None else [feats.gather(1, img_piv[..., None].expand(-1, -1, feats.shape[-1]))]
    if has_text and pivot_text:
        tf, tk = ctx["text_features"], ctx["text_keys"]
        if tf.shape[-1] != feats.shape[-1] or tf.shape[1] != (tk.shape[1] if tk.dim() == 3 else tk.shape[2]):
            raise ValueError(f"dart: text_features {list(tf.shape)} must match features' dim {feats.shape[-1]} and "
                             f"text_keys' T")
        p_txt = min(pivot_text, tf.shape[1])
        if p_txt:
            t_idx = _ranked(_l1(tk), p_txt)
            tfn = F.normalize(acc(tf).to(feats.dtype), dim=-1)
            piv_vecs.append(tfn.gather(1, t_idx[..., None].expand(-1, -1, tfn.shape[-1])))
    pivots = torch.cat(piv_vecs, 1) if piv_vecs else feats[:, :0]  # [B, m, Df]
    m = pivots.shape[1]
    rest = k - p_img
    kept = torch.zeros(b, n, dtype=torch.bool, device=tokens.device)
    if img_piv is not None:
        kept.scatter_(1, img_piv, True)
    if rest and m == 0:
        raise ValueError("dart: no pivot (pivot_image = 0 and no text pivots) to choose the other tokens by")
    sims = torch.einsum("bmd,bnd->bmn", pivots, feats) if m else None  # [B, m, N] cosine
    big = torch.finfo(feats.dtype).max
    for j in range(m):
        q = rest // m + (1 if j < rest % m else 0)
        if not q:
            continue
        s = sims[:, j].masked_fill(kept, big)  # kept tokens are never taken again
        take = ops.stable_topk(-s, q)  # the q least similar; ties → lowest index
        kept.scatter_(1, take, True)
    return Selection.from_mask(kept)
