"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
arXiv 2410.04417, ICML 2025).

SparseVLM prunes inside the language model, guided by the instruction:

* **Raters** (Sec. 3, relevant text tokens as raters): on the language model's *input* embeddings,
  ``R = softmax_T(V · Tᵀ)`` between the image's tokens ``V [N, D]`` and the text tokens after it ``T [T, D]``,
  averaged over the image tokens; the text tokens whose relevance is above the mean are the raters
  (:func:`text_relevance`; chosen once per prompt).
* **Sparsification** (Sec. 3): at a sparse layer, each visual token's score is the attention the raters pay it
  (heads averaged, rows averaged over the raters); the lowest-scored tokens are deleted.
* **Recycling** (Sec. 3, token recycling): the top 30 % of the deleted tokens by score are clustered with DPC-kNN and
  each cluster merged into one token (their mean), placed after the kept visual tokens.

What vtok reproduces is the authors' public code (``Gumpest/SparseVLMs``, ``USE_VERSION=1_0``, the paper's v1
numbers): fixed counts per sparse layer (their ``sparse_token_dict``, e.g. 192 tokens on LLaVA-1.5 = keep
``[300, 200, 110]`` after layers ``[2, 6, 15]``; the paper's rank-based adaptive count is not in that code), the
attention of the sparse layer itself with its output pruned, which for the kept tokens is exactly a vtok in-LLM stage
entering layer ``l + 1`` that reads layer ``l``'s attention, and ``int(0.3 · m) + 1`` recycled tokens in
``int(r / 10) + 1`` clusters with DPC-kNN over ``cluster_num`` nearest neighbours (self included). See
``sparsevlm_select`` for the budget and the differences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc, acc_dtype
from vtok.pruners._checks import check_int, check_k, check_real
from vtok.pruners.dpc_knn import dpc_knn
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


def text_relevance(visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's rater relevance (Sec. 3, rater selection): ``softmax_T(V · Tᵀ)`` averaged over the visual tokens
    → ``[T]`` (fp32), from the language model's input embeddings ``visual [N, D]`` and ``text [T, D]`` (the authors'
    code: no ``1/√D`` scale). The raters are the entries above their mean."""
    if visual.dim() != 2 or text.dim() != 2 or visual.shape[1] != text.shape[1]:
        raise ValueError(f"visual and text must be [N, D] and [T, D] with the same D, got {list(visual.shape)} and "
                         f"{list(text.shape)}")
    if text.shape[0] == 0:
        return text.new_zeros(0, dtype=acc_dtype(text))
    return (acc(visual) @ acc(text).T).softmax(-1).mean(0)


def _counts(n: int, kept: int, ratio: float, per_cluster: int) -> tuple[int, int]:
    """``(recycled, clusters)`` when ``kept`` of ``n`` tokens stay: ``int(ratio · (n − kept)) + 1`` of the deleted ones
    (at most all of them) into ``int(recycled / per_cluster) + 1`` clusters; ``(0, 0)`` when nothing is deleted."""
    m = n - kept
    if m <= 0:
        return 0, 0
    r = min(int(ratio * m) + 1, m)
    return r, min(int(r / per_cluster) + 1, r)


def sparsevlm_budget(n: int, kept: int, *, recycle_ratio: float = 0.3, cluster_size: int = 10) -> int:
    """Tokens a SparseVLM stage leaves when the authors' code keeps ``kept`` of ``n`` visual tokens and recycles the
    rest: ``kept + clusters`` (e.g. ``n=576, kept=300`` → 309). Pass it as ``keep`` to reproduce their schedule."""
    if not 0 <= kept <= n:
        raise ValueError(f"kept must be in [0, n={n}], got {kept}")
    return kept + _counts(n, kept, _check_ratio(recycle_ratio), _check_size(cluster_size))[1]


def _check_ratio(value: object) -> float:
    return check_real("recycle_ratio", value, 0.0, 1.0)


def _check_size(value: object) -> int:
    return check_int("cluster_size", value, 1)


def _split(n: int, k: int, ratio: float, per_cluster: int) -> tuple[int, int, int]:
    """``(kept, recycled, clusters)`` with ``kept + clusters == k``: the most kept tokens that do (``kept + clusters``
    grows by 0 or 1 per kept token, so every ``k`` from the all-recycled minimum up to ``n`` is reached)."""
    for kept in range(k, -1, -1):
        r, c = _counts(n, kept, ratio, per_cluster)
        if kept + c == k:
            return kept, r, c
    raise ValueError(f"sparsevlm: budget k={k} is below the fewest tokens it can give with recycling "
                     f"({sparsevlm_budget(n, 0, recycle_ratio=ratio, cluster_size=per_cluster)} of N={n}: every "
                     f"token deleted and its recycled part merged); pass recycle=False for smaller budgets")


def rater_scores(text_rows_attn: Tensor, relevance: Tensor) -> Tensor:
    """``[B, N]`` fp32: the attention the raters pay each visual token, averaged over the raters (Sec. 3; the
    authors' ``attn_postprocess_topk``). ``text_rows_attn [B, T, N]`` heads-averaged attention rows of the text tokens
    after the image; ``relevance [B, T]`` from :func:`text_relevance`; raters = relevance above its mean. A sample
    with no rater (every relevance equal, e.g. one text token) averages all its text rows (their code would average
    an empty set); with no text after the image every score is 0 (the lowest indices win)."""
    rel = acc(relevance)
    raters = rel > rel.mean(1, keepdim=True)
    raters = torch.where(raters.any(1, keepdim=True), raters, torch.ones_like(raters))
    a = acc(text_rows_attn)
    w = raters.to(a.dtype)
    return (a * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)


def sparsevlm_fewest(n: int, ctx: dict, *, recycle: bool = True, recycle_ratio: float = 0.3, cluster_size: int = 10,
                     **_: object) -> int:
    """The fewest tokens ``sparsevlm`` can give: with recycling, every token deleted and its recycled part merged."""
    return sparsevlm_budget(n, 0, recycle_ratio=recycle_ratio, cluster_size=cluster_size) if recycle else 1


@register("sparsevlm", family="attention", needs=("text_rows_attn", "text_relevance"), merges=True,
          fewest=sparsevlm_fewest,
          placement=Placement(positions="original"),
          paper="SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference "
                "(arXiv 2410.04417, ICML 2025)")
def sparsevlm_select(tokens: Tensor, k: int, ctx: Context, *, recycle: bool = True, recycle_ratio: float = 0.3,
                     cluster_size: int = 10) -> Selection:
    """SparseVLM (Sec. 3, Method): keep the visual tokens the text raters attend to most; recycle the best of the
    deleted ones as DPC-kNN cluster means.

    ``text_rows_attn [B, T, N]``: heads-averaged softmax attention of the ``T`` text tokens after the image to its
    ``N`` tokens (``vtok.wrap`` reads layer ``K − 1``'s); ``text_relevance [B, T]``: :func:`text_relevance` of the
    prompt's input embeddings. ``tokens [B, N, D]``: the hidden states the recycled clusters are averaged from.

    Budget: ``k`` is the count *after* recycling. With ``recycle`` the stage keeps the top ``kept`` tokens by
    :func:`rater_scores` and merges the top ``r = int(recycle_ratio · (N − kept)) + 1`` deleted ones into
    ``c = int(r / cluster_size) + 1`` clusters, ``kept + c = k`` (the largest such ``kept``; :func:`sparsevlm_budget`
    maps the authors' per-layer counts to ``k``). The clusters are DPC-kNN (``dpc_knn`` with ``knn = c``, self
    included, as their ``cluster_and_merge``), plain means, emitted after the kept tokens in descending centre score;
    each takes its centre's position. ``recycle=False``: plain top-``k`` (the authors' ``USE_VERSION=2_0`` cancels
    the merge). Ties → lowest index.

    Differences from the authors' code: they add ``rand · 1e-6`` to the DPC density (vtok breaks ties by index);
    their v1 code renumbers the positions of the kept sequence (vtok's in-LLM stages keep original positions, the
    merged tokens their centre's); their code runs batch 1 only.

    Raises:
        ValueError: with ``recycle``, ``k`` below the all-deleted minimum (``sparsevlm_budget(N, 0)``, 18 of 576).
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    if not isinstance(recycle, bool):
        raise ValueError(f"recycle must be a bool, got {recycle!r}")
    ratio, per = _check_ratio(recycle_ratio), _check_size(cluster_size)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    att, rel = ctx["text_rows_attn"], ctx["text_relevance"]
    if att.dim() != 3 or rel.shape != (b, att.shape[1]):
        raise ValueError(f"text_rows_attn [B, T, N] and text_relevance [B, T] must agree, got {list(att.shape)} and "
                         f"{list(rel.shape)}")
    score = rater_scores(att, rel)
    if not recycle:
        return Selection(ops.stable_topk(score, k), n)
    kept, r, c = _split(n, k, ratio, per)
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties → lower index first
    keep_idx = ranked[:, :kept].sort(1).values  # [B, kept] ascending
    rec_idx = ranked[:, kept:kept + r]  # [B, r] the best deleted tokens, in score order
    dev = tokens.device
    positions = torch.empty(b, k, dtype=torch.long, device=dev)
    assign = torch.full((b, n), -1, dtype=torch.long, device=dev)
    coef = torch.zeros(b, n, device=dev)
    for i in range(b):  # clusters differ per sample
        sub = tokens[i:i + 1].gather(1, rec_idx[i:i + 1, :, None].expand(-1, -1, tokens.shape[2]))
        sel = dpc_knn(sub, c, Context(), knn=c, include_self=True, order="score")
        if sel.merges:
            slot = sel.assign[0]  # [r] slot (ascending centre) of each recycled token
            emitted = sel.order[0] if sel.order is not None else torch.arange(c, device=dev)  # output j ← slot
            out_of_slot = torch.empty_like(emitted).scatter_(0, emitted, torch.arange(c, device=dev))
            centres = rec_idx[i, sel.keep[0][emitted]]
            lab = out_of_slot[slot]  # [r] cluster output index
        else:  # c == r: every recycled token is its own cluster, in score order
            centres = rec_idx[i]
            lab = torch.arange(r, device=dev)
        positions[i, :kept], positions[i, kept:] = keep_idx[i], centres
        assign[i, keep_idx[i]] = torch.arange(kept, device=dev)
        assign[i, rec_idx[i]] = kept + lab
        sizes = torch.bincount(lab, minlength=c).to(coef.dtype)
        coef[i, keep_idx[i]] = 1.0
        coef[i, rec_idx[i]] = 1.0 / sizes[lab]
    return Selection.from_emitted(positions, n, assign=assign, coef=coef)
