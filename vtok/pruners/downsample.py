"""Baseline ``downsample``: fewer tokens by a lower input resolution (``pool2d``'s grid; through ``vtok.wrap`` on
an any-resolution tower, the image itself is resized).

A baseline every comparison must report; independent benchmarks find random pruning a surprisingly strong
baseline (see ``shared/METHODS.md``).
"""

from __future__ import annotations

from torch import Tensor

from vtok.context import Context
from vtok.pruners.pool2d import pool2d_select
from vtok.pruners.registry import Placement, register
from vtok.selection import Selection


@register("downsample", family="baseline", needs=("grid",), merges=True,
          paper="baseline: a lower input resolution (VTC-Bench, arXiv 2510.07143, finds plain downsampling beats many "
                "methods); Qwen-style dynamic resolution = a smaller max_pixels",
          placement=Placement(resize_input=True))
def downsample_select(tokens: Tensor, k: int, ctx: Context) -> Selection:
    """Fewer tokens by a lower resolution: the ``grid=(h, w)`` patch grid of ``tokens [B, h*w, D]`` becomes the
    ``(oh, ow)`` grid of ``pool2d`` (``oh * ow == k``, aspect ratio kept).

    Through ``vtok.wrap`` on a VLM whose tower takes any resolution (Qwen2-VL, Qwen2.5-VL) the *image* is resized
    to that grid before the tower (what a smaller ``max_pixels`` does), so the tower's own tokens of the smaller
    image are what the LLM reads, each in place of the centre token of its cell. On a fixed-resolution tower
    (LLaVA's CLIP) and on plain tensors it is the equivalent spatial pooling of the patch grid: the average of each
    cell, i.e. the same selection as ``pool2d``.
    """
    return pool2d_select(tokens, k, ctx)
