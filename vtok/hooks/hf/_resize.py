"""Resize Qwen2-VL-style flattened patches (``downsample`` through ``vtok.wrap``): pure functions on tensors.

Qwen's processors flatten an image of ``(t·tp, C, h·p, w·p)`` pixels (``tp = temporal_patch_size`` frames per
temporal patch, ``p`` px patches, ``m = spatial_merge_size``) into ``[t·h·w, C·tp·p·p]`` rows ordered
``(t, h/m, w/m, m, m)``, each row ``(C, tp, p, p)``. ``unflatten`` inverts that, ``flatten`` redoes it; resizing in
between is what a smaller ``max_pixels`` in the processor does (up to the processor resizing the uint8 image before
normalising: resizing is linear, so only clipping and rounding differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def unflatten(rows: Tensor, thw: tuple[int, int, int], p: int, m: int, tp: int) -> Tensor:
    """``rows [t·h·w, C·tp·p·p]`` → pixels ``[t·tp, C, h·p, w·p]``."""
    t, h, w = thw
    c = rows.shape[-1] // (tp * p * p)
    x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, tp, C, h/m, m, p, w/m, m, p
    return x.reshape(t * tp, c, h * p, w * p)


def flatten(pixels: Tensor, p: int, m: int, tp: int) -> tuple[Tensor, tuple[int, int, int]]:
    """Pixels ``[t·tp, C, H, W]`` (``H``, ``W`` multiples of ``p·m``) → ``(rows [t·h·w, C·tp·p·p], (t, h, w))``."""
    f, c, hh, ww = pixels.shape
    t, h, w = f // tp, hh // p, ww // p
    x = pixels.reshape(t, tp, c, h // m, m, p, w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m, C, tp, p, p
    return x.reshape(t * h * w, c * tp * p * p), (t, h, w)


def resize_rows(rows: Tensor, thw: tuple[int, int, int], out_hw: tuple[int, int], p: int, m: int, tp: int
                ) -> tuple[Tensor, tuple[int, int, int]]:
    """One image's (or video's) rows resized to ``out_hw = (h', w')`` patches (multiples of ``m``): bicubic with
    anti-aliasing (as PIL's bicubic, which Qwen's processors use), in fp32. Returns the new rows and ``(t, h', w')``."""
    pix = unflatten(rows, thw, p, m, tp).float()
    out = F.interpolate(pix, size=(out_hw[0] * p, out_hw[1] * p), mode="bicubic", antialias=True, align_corners=False)
    return flatten(out.to(rows.dtype), p, m, tp)


def spread(small: Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> Tensor:
    """Tokens ``small [t·oh·ow, D]`` of the ``(oh, ow)`` grid placed over the ``(h, w)`` grid: every token of a
    ``pool2d`` cell gets its cell's token, so the cell's average is that token → ``[t·h·w, D]``."""
    from vtok.pruners._grid import grid_bins as _bins

    h, w = grid
    oh, ow = out_grid
    t = small.shape[0] // (oh * ow)
    rows, _ = _bins(h, oh, small.device)
    cols, _ = _bins(w, ow, small.device)
    cell = (rows[:, None] * ow + cols[None, :]).reshape(-1)  # [h·w]
    index = (torch.arange(t, device=small.device)[:, None] * (oh * ow) + cell[None, :]).reshape(-1)
    return small.index_select(0, index)
