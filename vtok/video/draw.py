"""A strip of video frames showing what a selection kept: kept patches bright with an outline, patches merged into
another token shaded, dropped patches dimmed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vtok.selection import Selection

KEPT = (255, 200, 0)
MERGED = (40, 120, 255)


def patch_status(sel: Selection, frames: int, grid: tuple[int, int]) -> np.ndarray:
    """``int8 [T, h, w]`` for sample 0: 2 = kept (an output token takes this position), 1 = merged into another
    token, 0 = dropped."""
    n = sel.n
    status = np.zeros(n, dtype=np.int8)
    represented = (sel.output_of_each_token()[0] >= 0).cpu().numpy()
    status[represented] = 1
    status[sel.keep[0].cpu().numpy()] = 2
    return status.reshape(frames, grid[0], grid[1])


def draw_strip(frames: np.ndarray, sel: Selection, grid: tuple[int, int], path: Path, *, columns: int = 8,
               thumb: int = 160, title: str | None = None) -> Path:
    """Draw every frame (``uint8 [T, H, W, 3]``, in rows of ``columns``, each scaled to ``thumb`` px wide) with its
    patches marked by :func:`patch_status`, under ``title`` (one or more lines); writes ``path`` and returns it."""
    t = len(frames)
    status = patch_status(sel, t, grid)
    h, w = grid
    th = max(1, round(thumb * frames.shape[1] / frames.shape[2]))
    cols = min(columns, t)
    rows = -(-t // cols)
    top = 8 + 14 * len(title.splitlines()) if title else 0
    canvas = Image.new("RGB", (cols * (thumb + 4) + 4, rows * (th + 4) + 4 + top), (255, 255, 255))
    pen = ImageDraw.Draw(canvas)
    if title:
        pen.multiline_text((6, 5), title, fill=(0, 0, 0), spacing=4)
    for i in range(t):
        img = np.asarray(Image.fromarray(frames[i]).resize((thumb, th), Image.BILINEAR)).astype(np.float32)
        ys = (np.arange(th) * h // th)[:, None]
        xs = (np.arange(thumb) * w // thumb)[None, :]
        s = status[i][ys, xs]  # [th, thumb] status per pixel
        out = img.copy()
        out[s == 0] *= 0.25
        out[s == 1] = 0.55 * img[s == 1] + 0.45 * np.array(MERGED, np.float32)
        tile = Image.fromarray(out.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(tile)
        for r in range(h):
            for c in range(w):
                if status[i, r, c] == 2:
                    x0, y0 = c * thumb // w, r * th // h
                    x1, y1 = (c + 1) * thumb // w - 1, (r + 1) * th // h - 1
                    d.rectangle([x0, y0, x1, y1], outline=KEPT)
        canvas.paste(tile, (4 + (i % cols) * (thumb + 4), top + 4 + (i // cols) * (th + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
