"""VidCom²: Video Compression Commander (Liu et al., "Video Compression Commander: Plug-and-Play Inference
Acceleration for Video Large Language Models", EMNLP 2025, arXiv 2505.14454): frame-uniqueness-aware budgets, then
the most distinctive tokens of each frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vtok.context import Context
from vtok.kernels.reference import acc
from vtok.pruners._video import allocate, frame_layout
from vtok.pruners.registry import register
from vtok.selection import Selection

VIDCOM2 = ("VidCom2: Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language "
           "Models (EMNLP 2025, arXiv 2505.14454)")
ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)  # the multi-scale Gaussian bandwidths of the authors' code


def _gauss(x: Tensor, centre: Tensor) -> Tensor:
    """``Σ_α exp(−‖x − c‖² / 2α)`` over ``ALPHAS``: ``x [..., C]``, ``centre`` broadcastable → ``[...]``."""
    d2 = (x - centre).pow(2).sum(-1)
    return sum(torch.exp(-d2 / (2 * a)) for a in ALPHAS)


def vidcom2_scores(x: Tensor, t: int, channel_ratio: float = 0.5, temperature: float = 0.01) -> tuple[Tensor, Tensor]:
    """One video ``x [T·P, D]`` → ``(frame weights [T], token scores [T, P])``.

    Channels: the ``channel_ratio`` share with the lowest variance over the video's tokens (ties → lower channel).
    Token score: similarity to the video centre plus similarity to its frame's centre (multi-scale Gaussian kernels on
    L2-normalised tokens); low = distinctive. Frame weight: ``1 + p_f − mean(p)`` with ``p = softmax(u / τ)`` of the
    frame uniqueness ``u_f = −mean_i sim(x_fi, video centre)`` (Sec. 3.2–3.3).
    """
    n, d = x.shape
    p = n // t
    c = max(1, int(d * channel_ratio))
    var = x.var(0, unbiased=False)
    chans = torch.sort(var, stable=True).indices[:c]
    f = F.normalize(x[:, chans].reshape(t, p, c), dim=-1)
    v = _gauss(f, f.mean((0, 1), keepdim=True))
    fr = _gauss(f, f.mean(1, keepdim=True))
    u = -v.mean(1)
    probs = torch.softmax((u - u.max()) / temperature, dim=0)
    return 1 + probs - probs.mean(), v + fr


@register("vidcom2", family="temporal", needs=("frames",), uses=("grid",), paper=VIDCOM2)
def vidcom2_select(tokens: Tensor, k: int, ctx: Context, *, channel_ratio: float = 0.5,
                   temperature: float = 0.01) -> Selection:
    """VidCom² (Sec. 3): unique frames get more tokens, and each frame keeps its most distinctive tokens.

    ``tokens [B, T·P, D]`` (``frames=T``). Per sample, :func:`vidcom2_scores` gives frame weights ``w_f`` and token
    scores; frame ``f`` keeps ``k_f`` tokens with the lowest scores (ties → lower index), ``k_f`` the exact split of
    ``k`` proportional to ``w_f`` (largest remainders, capped at ``P``). The authors' code sets
    ``k_f = round(k / T · w_f)`` with at least one token per frame, so its total can miss the budget by a few tokens;
    vtok keeps exactly ``k`` (a frame may get none when ``k < T``). Options: the authors' defaults.
    Returns ``keep [B, k]``.
    """
    b, n, _ = tokens.shape
    t, p, _ = frame_layout(tokens, ctx)
    if not 0.0 < float(channel_ratio) <= 1.0:
        raise ValueError(f"channel_ratio must lie in (0, 1], got {channel_ratio!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if k == n:
        return Selection.identity(b, n, tokens.device)
    rows = []
    caps = torch.full((t,), p, dtype=torch.long)
    for i in range(b):
        w, score = vidcom2_scores(acc(tokens[i].detach()), t, channel_ratio, temperature)
        ks = allocate(k, w, caps).tolist()
        keep = []
        for f, kf in enumerate(ks):
            if kf:
                order = torch.sort(score[f], stable=True).indices[:kf]
                keep.append(order + f * p)
        rows.append(torch.cat(keep))
    return Selection.from_indices(torch.stack(rows).to(tokens.device), n)
