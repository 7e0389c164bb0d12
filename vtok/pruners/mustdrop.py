"""MustDrop's vision-encoding stage (Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
Language Model", arXiv 2411.10803, Sec. 3.2 "local spatial merging").

The patch grid is cut into ``window × window`` blocks; a block whose tokens are alike (mean pairwise cosine, self
excluded) is merged into one token (the mean of the block, placed at its last, bottom-right, token). The most similar
blocks merge first. This is the stage that LightCompress ships as "MustDrop" and that vtok places where the paper
does: on the vision tower's feature layer (``Placement(layer=-2, at="output")``), i.e. pre-LLM in ``vtok.wrap``. The
paper's prefill stage (dual-attention filtering) is the in-LLM strategy ``mustdrop_llm`` below, with exact budgets; the
decode-time KV policy is not in vtok.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc
from vtok.pruners._checks import check_choice, check_int, check_k
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


def _windows(h: int, w: int, size: int, device: torch.device) -> Tensor:
    """``[W, size²]`` token indices of the full ``size × size`` windows of an ``h × w`` row-major grid (row-major
    within each window; windows in row-major order; a remainder row / column belongs to no window)."""
    idx = torch.arange(h * w, device=device).reshape(h, w)[: h - h % size, : w - w % size]
    gh, gw = idx.shape[0] // size, idx.shape[1] // size
    return idx.reshape(gh, size, gw, size).permute(0, 2, 1, 3).reshape(gh * gw, size * size)


def window_similarity(tokens: Tensor, grid: tuple[int, int], window: int = 2) -> tuple[Tensor, Tensor]:
    """``(similarity [B, W], windows [W, m])``: each window's mean pairwise cosine similarity of its ``m = window²``
    tokens, the ``m`` self-similarities excluded (MustDrop's block similarity)."""
    win = _windows(grid[0], grid[1], window, tokens.device)
    m = win.shape[1]
    x = F.normalize(acc(tokens)[:, win], dim=-1)  # [B, W, m, D]
    sims = x @ x.transpose(-1, -2)  # [B, W, m, m]
    off = sims.sum((-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off / (m * (m - 1)), win


def mustdrop_budget(tokens: Tensor, grid: tuple[int, int], threshold: float = 0.8, window: int = 2) -> int:
    """The adaptive count of the authors' code: every window whose similarity reaches ``threshold`` merges (the
    fewest such windows over the batch), leaving ``N − r · (window² − 1)`` tokens. Pass it as ``keep``."""
    sim, win = window_similarity(tokens, grid, window)
    r = int((sim >= threshold).sum(1).min()) if sim.numel() else 0
    return tokens.shape[1] - r * (win.shape[1] - 1)


def mustdrop_fewest(n: int, ctx: dict, *, window: int = 2, **_: object) -> int:
    """The fewest tokens ``mustdrop`` can give: every full ``window × window`` block of the grid merged."""
    h, w = ctx["grid"]
    blocks = (h // window) * (w // window)
    return n - blocks * (window * window - 1)


@register("mustdrop", family="clustering", needs=("grid",), merges=True, fewest=mustdrop_fewest,
          placement=Placement(layer=-2, at="output", prop_attn=False),
          paper="Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model "
                "(arXiv 2411.10803)")
def mustdrop_select(tokens: Tensor, k: int, ctx: Context, *, window: int = 2, order: str = "reference") -> Selection:
    """MustDrop local spatial merging (Sec. 3.2): merge the most self-similar ``window × window`` blocks of the
    ``grid`` into one token each (their mean) until ``k`` tokens are left.

    ``r = ⌊(N − k) / (m − 1)⌋`` whole blocks merge (``m = window²``); where ``N − k`` is not a multiple of ``m − 1``
    the next block merges only its first ``e`` tokens into its last one, so the budget is exact (the authors' count
    ``N − r (m − 1)`` comes from a threshold: :func:`mustdrop_budget`). Ties → lower block index first. A remainder
    row / column of the grid is never merged. ``order="reference"`` emits the merged blocks first, most similar
    first, then the other tokens by position (the authors' / LightCompress's order); ``"position"`` by position.

    Raises:
        ValueError: ``k`` below ``N − W (m − 1)`` (every block merged), a bad ``window`` or ``order``.
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    check_choice("order", order, ("reference", "position"))
    window = check_int("window", window, 2)
    if k == n:
        return Selection.identity(b, n, tokens.device)
    sim, win = window_similarity(tokens, ctx["grid"], window)
    n_win, m = win.shape
    r, e = divmod(n - k, m - 1)
    if r + (e > 0) > n_win:
        raise ValueError(f"mustdrop: budget k={k} is below the fewest tokens it can give ({n - n_win * (m - 1)}: "
                         f"all {n_win} {window}x{window} blocks of the {ctx['grid']} grid merged)")
    ranked = torch.sort(sim, dim=1, descending=True, stable=True).indices  # [B, W]
    dev = tokens.device
    target = torch.arange(n, device=dev).expand(b, n).clone()  # each token's representative (itself if unmerged)
    blocks = win[ranked[:, : r + (e > 0)]]  # [B, r(+1), m]
    dst = blocks[..., -1:]  # the block's last token receives it
    src = blocks[:, :r, :-1]
    target.scatter_(1, src.reshape(b, -1), dst[:, :r].expand(-1, -1, m - 1).reshape(b, -1))
    if e:
        target.scatter_(1, blocks[:, r, :e], blocks[:, r, -1:].expand(-1, e))
    kept = target == torch.arange(n, device=dev)  # [B, N]: representatives
    merged = dst[..., 0]  # [B, r(+1)] in rank order
    if order == "reference":
        is_dst = torch.zeros(b, n, dtype=torch.bool, device=dev).scatter_(1, merged, True)
        rest = torch.sort((~(kept & ~is_dst)).to(torch.uint8), dim=1, stable=True).indices[:, : k - merged.shape[1]]
        positions = torch.cat([merged, rest], 1)
    else:
        positions = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices[:, :k]
    out_of = torch.full((b, n), -1, dtype=torch.long, device=dev)
    out_of.scatter_(1, positions, torch.arange(k, device=dev).expand(b, k))
    return Selection.from_emitted(positions, n, assign=out_of.gather(1, target))


def _margins(text_rows_attn: Tensor, global_thr: float, individual_thr: float) -> Tensor:
    """``[B, N]``: how far each token is from MustDrop's drop rule, ``max(g / global_thr, m / individual_thr)`` with
    ``g`` its share of the attention the text rows pay the image and ``m`` the largest single text row's attention."""
    a = acc(text_rows_attn)
    got = a.sum(1)  # [B, N]
    share = got / got.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.maximum(share / global_thr, a.amax(1) / individual_thr) if a.shape[1] else torch.zeros_like(got)


def _check_thr(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0.0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return float(value)


def mustdrop_llm_budget(text_rows_attn: Tensor, global_thr: float = 0.001, individual_thr: float = 0.001) -> int:
    """The authors' adaptive count at one prefill layer: the tokens their dual-attention filter keeps (share of the text
    rows' attention ``>= global_thr`` or some row's attention ``>= individual_thr``), the fewest over the batch."""
    m = _margins(text_rows_attn, _check_thr("global_thr", global_thr), _check_thr("individual_thr", individual_thr))
    return int((m >= 1).sum(1).min()) if m.numel() else 0


@register("mustdrop_llm", family="attention", needs=("text_rows_attn",),
          placement=Placement(positions="original", decode_kv="final"),
          paper="Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large Language Model "
                "(arXiv 2411.10803), prefill stage")
def mustdrop_llm_select(tokens: Tensor, k: int, ctx: Context, *, global_thr: float = 0.001,
                        individual_thr: float = 0.001) -> Selection:
    """MustDrop's prefilling stage (Sec. 3; the code's ``dual_attention_filter``): drop the image tokens that get little
    attention from the text after the image both globally (their share of it) and individually (every text token's).

    ``text_rows_attn [B, T, N]``: heads-averaged attention of the text tokens after the image (``vtok.wrap`` reads
    layer ``K − 1``'s, as the authors' code prunes after layer ``l`` with its own attention; their layers
    ``[2, 6, 10, 14]`` → ``layer=[3, 7, 11, 15]``). Their rule drops a token when ``share < global_thr`` *and*
    ``max < individual_thr`` (both 0.001 in their scripts), i.e. when ``max(share / global_thr, max / individual_thr)
    < 1``; vtok keeps the ``k`` tokens with the largest such margin (ties → lowest index), which at the authors' count
    (:func:`mustdrop_llm_budget`) is exactly their set. With the vision stage: ``vtok.wrap(model, ["mustdrop",
    "mustdrop_llm", ...], ...)``. Its decode stage (after the prefill, the layers from the first pruning layer on
    drop every later-pruned token from their KV cache) is the wrapper's ``decode_kv="final"``, this method's
    default. Not here: their always-kept "key set" from the vision stage; their code renumbers positions, vtok keeps
    the original ones.
    """
    b, n = tokens.shape[:2]
    check_k(k, n)
    m = _margins(ctx["text_rows_attn"], _check_thr("global_thr", global_thr),
                 _check_thr("individual_thr", individual_thr))
    if k == n:
        return Selection.identity(b, n, tokens.device)
    return Selection(ops.stable_topk(m, k), n)
