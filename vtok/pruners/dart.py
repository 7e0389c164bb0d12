"""DART: duplication-aware token reduction (Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", arXiv 2502.11494).

Instead of scoring importance, DART picks a few *pivot* tokens and keeps, for each pivot, the image tokens least
similar to it (the duplicates of a pivot are what it drops). In the authors' LLaVA / Qwen2-VL code the reduction runs
before LLM layer ``K = 2``: pivots are the 4 image tokens and the 4 instruction tokens (after the image) with the
largest L1 norm of their layer-``K − 1`` attention keys (all heads), and similarity is the cosine of the hidden states
entering layer ``K`` after the LLM's final norm; the pivots take their tokens in the order of a Python ``set`` of
their sequence indices. ``vtok.wrap`` supplies exactly that context (``keys``, ``features``, ``text_keys``,
``text_features``, ``seq_index``, ``text_seq_index``); on plain tensors the tokens themselves are the features, only
image pivots exist unless ``text_*`` is given, and without ``seq_index`` the image pivots go first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_int
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection

_ORDERS = ("auto", "set", "rank")
_LINEAR_PROBES, _PERTURB_SHIFT, _SET_MINSIZE = 9, 5, 8  # CPython's setobject.c


def _set_insert(table: list[int | None], key: int) -> None:
    """Insert the int ``key`` (hash = itself) into an open-addressing ``table`` as CPython's ``set`` does: its home
    slot ``key & mask``, then up to 9 linear probes (only where they stay inside the table), then the perturbed
    jump ``i = (5 i + 1 + perturb) & mask`` with ``perturb >>= 5`` each time."""
    mask = len(table) - 1
    i = perturb = key
    i &= mask
    while True:
        if table[i] is None or table[i] == key:
            table[i] = key
            return
        if i + _LINEAR_PROBES <= mask:
            for j in range(i + 1, i + _LINEAR_PROBES + 1):
                if table[j] is None or table[j] == key:
                    table[j] = key
                    return
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


def cpython_set_order(keys: list[int]) -> list[int]:
    """The iteration order of ``set(keys)`` in CPython 3.7–3.13, for ints in ``[0, 2**61 − 1)`` (each its own hash).

    ``set(list)`` starts with 8 slots and inserts the keys one by one; once ``5 · fill ≥ 3 · mask`` it re-inserts
    every key, in slot order, into the smallest power of two above ``4 · used``; iteration walks the slots. For
    DART's 4 + 4 pivots: the 4 image pivots go into 8 slots by ``p mod 8``; the 5th key (the first text pivot)
    triggers the move to 32 slots, where those five, then the 3 other text pivots, sit at ``p mod 32``, a taken
    slot passing the key on to the next free one of the 9 after it (or, from slot 23 on, to the perturbed jump) —
    so the order is ``p mod 32``, ties and wrap-arounds by insertion. Checked against the interpreter's own
    ``set`` in the tests (and on CPython 3.7–3.13 while writing it).
    """
    table: list[int | None] = [None] * _SET_MINSIZE
    used = 0
    for key in keys:
        if not 0 <= key < (1 << 61) - 1:
            raise ValueError(f"cpython_set_order: keys must be ints in [0, 2**61 - 1), got {key}")
        if key in table:
            continue
        _set_insert(table, key)
        used += 1
        if used * 5 >= (len(table) - 1) * 3:
            size = _SET_MINSIZE
            while size <= used * 4:
                size <<= 1
            old, table = table, [None] * size
            for k in old:
                if k is not None:
                    _set_insert(table, k)
    return [k for k in table if k is not None]


def _ranked(scores: Tensor, k: int) -> Tensor:
    """``[B, k]`` indices of the ``k`` largest ``scores [B, N]`` in descending order, ties → lower index first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def _l1(keys: Tensor) -> Tensor:
    """``[B, N]`` L1 norm of each token's key over all heads: ``keys [B, N, Dk]`` or ``[B, H, N, dh]``."""
    k = acc(keys)
    return k.abs().sum(-1) if k.dim() == 3 else k.abs().sum((1, 3))


def _set_permutation(pos: Tensor) -> Tensor:
    """``[B, m]``: per sample, the pivots (``pos [B, m]``: their sequence indices, image pivots then text pivots, each
    by descending key norm, as the authors build ``set(image_indices + query_indices)``) in that set's iteration
    order."""
    out = []
    for row in pos.tolist():
        if len(set(row)) != len(row):
            raise ValueError(f"dart: the pivots' sequence indices must be distinct, got {row}")
        slot = {p: i for i, p in enumerate(row)}
        out.append([slot[p] for p in cpython_set_order(row)])
    return torch.tensor(out, dtype=torch.long, device=pos.device)


@register("dart", family="diversity", needs=("keys",),
          uses=("features", "text_features", "text_keys", "seq_index", "text_seq_index"),
          placement=Placement(positions="original",
                              llm_only="its pivots are the largest L1 norms of language-model layer K-1's keys, "
                                       "compared on the LLM's final-normed hidden states, with instruction pivots; "
                                       "before the language model only the vision tower's keys exist (the authors "
                                       "prune at layer=2)"),
          paper="DART: Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
                "(arXiv 2502.11494)")
def dart_select(tokens: Tensor, k: int, ctx: Context, *, pivot_image: int = 4, pivot_text: int = 4,
                pivot_order: str = "auto") -> Selection:
    """DART (Sec. 3, Eq. 4–6): keep the pivots' least-duplicated tokens.

    ``tokens [B, N, D]``; ``keys`` of the same tokens pick the ``pivot_image`` image pivots (largest key L1 norm,
    kept); ``text_keys`` / ``text_features`` (``[B, T, ·]``) the ``pivot_text`` instruction pivots (not kept: they are
    not image tokens). Each pivot in turn takes its quota of the not-yet-kept image tokens with the *lowest* cosine
    similarity to it, on ``features`` (default: the tokens). Quotas split ``k − #image pivots`` as evenly as possible
    (earlier pivots take the remainder). Ties → lowest index.

    ``pivot_order`` — the order the pivots take their tokens in, which decides the set where their least-similar
    tokens overlap:

    * ``"set"``: the authors' (``get_retained_image_token``): they iterate ``set(image_indices + query_indices)``,
      the pivots' sequence indices, so the order is CPython's set order (:func:`cpython_set_order`: roughly the index
      mod 32). Needs ``seq_index`` (and ``text_seq_index`` with text pivots); ``vtok.wrap`` gives both (each
      token's index in its unpadded sequence at the stage).
    * ``"rank"``: image pivots first, then text pivots, each group by descending key norm (vtok's earlier order;
      needs no indices).
    * ``"auto"`` (default): ``"set"`` where ``seq_index`` is given, else ``"rank"``.

    A difference from the authors' code that keeps vtok's exact budget: there every pivot takes ``(keep) // #pivots``
    tokens and the image pivots come on top (e.g. 132 tokens for a budget of 128); with ``k = #image pivots +
    #pivots · q`` vtok's quotas are theirs. Defaults: 4 + 4 pivots (their scripts). Returns ``keep [B, k]``.
    """
    b, n = tokens.shape[:2]
    pivot_image, pivot_text = check_int("pivot_image", pivot_image, 0), check_int("pivot_text", pivot_text, 0)
    if pivot_order not in _ORDERS:
        raise ValueError(f"pivot_order must be one of {list(_ORDERS)}, got {pivot_order!r}")
    if k == n:
        return Selection.identity(b, n, tokens.device)
    has_text = "text_features" in ctx and "text_keys" in ctx
    if ("text_features" in ctx) != ("text_keys" in ctx):
        raise ValueError("dart: pass both 'text_features' and 'text_keys' (the instruction pivots), or neither")
    order = ("set" if "seq_index" in ctx else "rank") if pivot_order == "auto" else pivot_order
    if order == "set" and "seq_index" not in ctx:
        raise ValueError("dart: pivot_order='set' needs context 'seq_index' (the tokens' sequence indices)")
    feats = F.normalize(acc(ctx.get("features", tokens)), dim=-1)  # [B, N, Df]
    p_img = min(pivot_image, k)
    img_piv = _ranked(_l1(ctx["keys"]), p_img) if p_img else None  # [B, p] by descending norm
    piv_vecs = [] if img_piv is None else [feats.gather(1, img_piv[..., None].expand(-1, -1, feats.shape[-1]))]
    piv_pos = [] if img_piv is None or order != "set" else [ctx["seq_index"].to(img_piv.device).gather(1, img_piv)]
    if has_text and pivot_text:
        tf, tk = ctx["text_features"], ctx["text_keys"]
        t = tk.shape[1] if tk.dim() == 3 else tk.shape[2]
        if tf.shape[-1] != feats.shape[-1] or tf.shape[1] != t:
            raise ValueError(f"dart: text_features {list(tf.shape)} must match features' dim {feats.shape[-1]} and "
                             f"text_keys' T")
        p_txt = min(pivot_text, tf.shape[1])
        if p_txt:
            t_idx = _ranked(_l1(tk), p_txt)
            tfn = F.normalize(acc(tf).to(feats.dtype), dim=-1)
            piv_vecs.append(tfn.gather(1, t_idx[..., None].expand(-1, -1, tfn.shape[-1])))
            if order == "set":
                ti = ctx.get("text_seq_index")
                if ti is None or ti.shape[1] != t:
                    got = "none" if ti is None else list(ti.shape)
                    raise ValueError(f"dart: pivot_order='set' with text pivots needs 'text_seq_index' [B, T={t}], "
                                     f"got {got}")
                piv_pos.append(ti.to(t_idx.device).gather(1, t_idx))
    pivots = torch.cat(piv_vecs, 1) if piv_vecs else feats[:, :0]  # [B, m, Df]
    m = pivots.shape[1]
    if order == "set" and m:
        perm = _set_permutation(torch.cat(piv_pos, 1))
        pivots = pivots.gather(1, perm[..., None].expand(-1, -1, pivots.shape[-1]))
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
