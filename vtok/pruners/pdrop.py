"""PyramidDrop (arXiv 2410.17247): FastV's ranking at the end of each stage of the language model, read from
the stage's own attention layer.
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.pruners.fastv import fastv_select
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


@register("pdrop", family="attention", needs=("text_attn",),
          placement=Placement(positions="original", attn_layer="own"),
          paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction "
                "(arXiv 2410.17247)")
def pdrop_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """PyramidDrop (Sec. 3.2): at the end of each stage keep the ``k`` image tokens the last instruction token
    attends to most (``text_attn`` ``[B, N]``, or ``[B, T, N]`` / ``[B, H, T, N]`` reduced as FastV's ``"last"``).

    What differs from FastV is where the attention comes from, which ``vtok.wrap`` handles (``Placement.attn_layer
    = "own"``): the authors' code ranks before layer ``K`` with layer ``K``'s own ``input_layernorm``, ``q_proj`` /
    ``k_proj`` and RoPE on the hidden states entering it (FastV reads layer ``K − 1``'s attention). A pyramid is a
    list of stages, e.g. LLaVA-1.5's ``layer=[8, 16, 24], keep=[0.5, 0.25, 0.125]`` (the paper's λ = 0.5; ``keep`` is
    of the original image tokens, as their ``image_token_ratio_list``). Ties → lowest index (the authors' ``topk``
    leaves them unspecified). Difference: their code renumbers the positions of the kept sequence after each drop;
    vtok's in-LLM stages keep the tokens' original positions.
    """
    return fastv_select(tokens, k, ctx, query_source="last")
