"""Transition strategies: importance from how much a token's representation changes inside the model.

TransPrune (Li et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model",
arXiv 2507.20630, CVPR 2026; authors' release github.com/liaolea/TransPrune).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels.reference import acc_dtype
from vtok.pruners.registry import register
from vtok.selection import Selection

COMPARE_MODES = ("update", "state")
_EPS = 1e-8  # guards the norm ratio and the cosine against zero vectors (as torch's cosine_similarity does)


def transition_variation(prev_hidden: Tensor, tokens: Tensor, *, compare: str = "update") -> Tensor:
    """Token Transition Variation accumulated over a window of transitions: ``[B, N]`` (fp32, fp64 for fp64 input).

    ``prev_hidden`` is one earlier state ``[B, N, D]`` or ``L`` earlier states ``[L, B, N, D]`` in layer order;
    ``tokens [B, N, D]`` is the latest. Each consecutive pair ``(x, y)`` of states is one transition whose
    *input* is ``x`` and whose *output* is ``o = y - x`` (``compare="update"``: what the layer added to the
    residual stream, the paper's module output) or ``o = y`` (``compare="state"``: the next state itself).
    Per transition and token ``i``::

        magnitude_i = ||o_i|| / ||x_i||
        direction_i = softmax_i(1 - cos(x_i, o_i))        # softmax over the N tokens of the sample
        TTV_i      += magnitude_i * direction_i

    Memory ``O(B·N·D)`` per transition; no ``N × N`` term.
    """
    if compare not in COMPARE_MODES:
        raise ValueError(f"compare must be one of {COMPARE_MODES}, got {compare!r}")
    states = prev_hidden[None] if prev_hidden.dim() == 3 else prev_hidden
    acc = acc_dtype(tokens)
    ttv = torch.zeros(tokens.shape[:2], device=tokens.device, dtype=acc)
    for layer in range(states.shape[0]):
        x = states[layer].to(acc)
        y = (states[layer + 1] if layer + 1 < states.shape[0] else tokens).to(acc)
        out = y - x if compare == "update" else y
        nx = torch.linalg.vector_norm(x, dim=-1)
        no = torch.linalg.vector_norm(out, dim=-1)
        magnitude = no / nx.clamp_min(_EPS)
        cos = (x * out).sum(-1) / (nx * no).clamp_min(_EPS)
        direction = torch.softmax(1.0 - cos, dim=1)
        ttv += magnitude * direction
    return torch.nan_to_num(ttv, nan=0.0, posinf=torch.finfo(acc).max)


def instruction_attention(text_attn: Tensor) -> Tensor:
    """Instruction-Guided Attention ``[B, N]`` from ``[B, N]``, ``[B, T, N]`` or ``[B, H, T, N]``: the mean over
    heads and instruction tokens of the attention they pay each visual token (fp32, fp64 for fp64 input)."""
    a = text_attn.to(acc_dtype(text_attn))
    while a.dim() > 2:
        a = a.mean(1)
    return a


def _sum_normalise(x: Tensor) -> Tensor:
    """Per-sample ``x / Σ x`` (rows summing to 0 stay 0)."""
    return x / x.sum(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


@register("transprune", family="transition", needs=("prev_hidden",), uses=("text_attn",),
          paper="TransPrune (arXiv 2507.20630): token transition variation + instruction-guided attention")
def transprune(tokens: Tensor, k: int, ctx: Context, *, alpha: float = 0.5, compare: str = "update") -> Selection:
    """Keep the ``k`` tokens whose representation changes most across layers (TTV), mixed with instruction attention.

    TransPrune (arXiv 2507.20630, Sec. 3) scores each visual token ``i`` by two signals:

    * **TTV** (token transition variation): for each transition of a token through the model, the change in
      magnitude ``||o_i|| / ||x_i||`` times the change in direction ``softmax_i(1 - cos(x_i, o_i))`` (softmax
      over the image tokens), summed over the transitions of a window of layers (see
      :func:`transition_variation`). The paper's transitions are the attention and FFN modules of each layer
      (input ``x`` = the normalised module input, ``o`` = the module output); here they are the layer-to-layer
      transitions of the hidden states we are given: ``ctx["prev_hidden"]`` (``[B, N, D]`` = the state one layer
      earlier, or ``[L, B, N, D]`` = ``L`` earlier states in order) followed by ``tokens`` (the latest state).
      With ``compare="update"`` (default) ``o = h^{l+1} - h^l`` is what the layer added, which is the residual
      branch the paper measures; ``compare="state"`` compares consecutive states directly (``o = h^{l+1}``).
    * **IGA** (instruction-guided attention, optional ``ctx["text_attn"]``): attention from the instruction
      tokens to each visual token, averaged over heads and instruction tokens.

    Each signal is normalised to sum to 1 over the ``N`` tokens of a sample, then
    ``score = alpha · TTV + (1 - alpha) · IGA``. ``alpha = 0.5`` ranks exactly like the authors' released
    ``TTV + IGA``; ``alpha = 1`` is the paper's TTV-only variant, which is also what runs when no ``text_attn``
    is given. The top ``k`` by score are kept (ties → lowest index). The paper applies this progressively at a
    few LLM layers; one call is one such pruning step.

    Options:
        alpha: weight of TTV in ``[0, 1]`` (IGA gets ``1 - alpha``).
        compare: ``"update"`` or ``"state"``, see above.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (weight of TTV against IGA), got {alpha!r}")
    if compare not in COMPARE_MODES:
        raise ValueError(f"compare must be one of {COMPARE_MODES}, got {compare!r}")
    if "prev_hidden" not in ctx:
        raise ValueError("transprune needs context 'prev_hidden' (earlier hidden states [B, N, D] or [L, B, N, D])")
    prev = ctx["prev_hidden"]
    if prev.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"context 'prev_hidden' must have the tokens' feature size D={tokens.shape[-1]}, "
                         f"got {list(prev.shape)}")
    score = _sum_normalise(transition_variation(prev, tokens, compare=compare))
    text_attn = ctx.get("text_attn")
    if text_attn is not None and float(alpha) < 1.0:
        iga = _sum_normalise(instruction_attention(text_attn).to(score.dtype))
        score = float(alpha) * score + (1.0 - float(alpha)) * iga
    return Selection(ops.stable_topk(score, k), tokens.shape[1])
