"""``vtok demo``: every strategy that runs on raw patches, at a few budgets, on a real photo.

A scikit-image photo is cut into 16×16 patch tokens (14×14 = 196, like ViT-B/16 at 224). Each method keeps
``keep`` of them; the picture shows what survives: kept patches at full brightness, dropped ones dimmed,
merged ones replaced by their merged value. The table reports a crude fidelity proxy: PSNR of the photo
rebuilt from the output tokens (each dropped patch filled from the nearest kept patch on the grid).

A method with a budget floor (``Method.fewest``, e.g. ``mustdrop``: every 2×2 block merged) runs at its fewest tokens
where the asked budget is below it, and its row says so; a budget a method cannot make at all (``pool2d`` needs
``k = oh · ow``) becomes a row that names the reason instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

import vtok
from vtok.budget import resolve_k
from vtok.images import patchify, psnr, sample_photo, to_pil, unpatchify
from vtok.selection import Selection

DEMO_CONTEXT = {"grid"}  # context the demo can supply without a model


@dataclass
class DemoRow:
    method: str
    family: str
    keep: float
    kept: int
    total: int
    psnr_db: float
    note: str = ""


def _grid_coords(grid: tuple[int, int]) -> Tensor:
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], 1).float()


def rebuild(out: Tensor, sel: Selection, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per-patch tokens ``[N, D]`` rebuilt from the output (in its emitted order), and a ``[N]`` kept/merged mask,
    for sample 0."""
    idx = sel.output_of_each_token()[0].clone()  # the output row each patch went to, -1 if dropped
    dropped = idx < 0
    shown = torch.ones(sel.n, dtype=torch.bool) if sel.merges else ~dropped
    if dropped.any():  # fill from the nearest kept patch on the grid
        coords = _grid_coords(grid)
        idx[dropped] = torch.cdist(coords[dropped], coords[sel.emitted_keep()[0]]).argmin(1)
    return out[0, idx], shown


def run_demo(out_dir: str | Path, *, photo: str = "astronaut", size: int = 224, patch: int = 16,
             keeps: tuple[float, ...] = (0.5, 0.25, 0.1), methods: list[str] | None = None) -> list[DemoRow]:
    """Run the demo; writes ``kept_patches.png`` into ``out_dir`` and returns the table rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = sample_photo(photo, size)
    grid = (size // patch, size // patch)
    tokens = patchify(image[None], patch)
    names = methods or [m.name for m in vtok.methods() if m.needs <= DEMO_CONTEXT]
    rows: list[DemoRow] = []
    panels: list[list[tuple[str, Image.Image]]] = []
    n = tokens.shape[1]
    for name in names:
        info = vtok.get_method(name)
        ctx = {"grid": grid} if "grid" in info.needs | info.uses else {}
        fewest = info.fewest(n, {"grid": grid})
        line = []
        for keep in keeps:
            k, note = resolve_k(keep, n), ""
            if k < fewest:
                k, note = fewest, f"at its fewest: {fewest} tokens ({resolve_k(keep, n)} asked)"
            try:
                out, sel = vtok.compress(tokens, name, k, **ctx)
            except ValueError as e:  # a budget this method cannot make (e.g. pool2d needs k = oh * ow)
                rows.append(DemoRow(name, info.family, keep, 0, n, float("nan"), f"skipped: {e}"))
                line.append((f"{name}: skipped", to_pil(0.25 * image + 0.35)))
                continue
            per_patch, shown = rebuild(out, sel, grid)
            recon = unpatchify(per_patch[None], grid, patch)[0]
            rows.append(DemoRow(name, info.family, keep, sel.k, sel.n, psnr(recon, image), note))
            dim = torch.where(shown[:, None], per_patch, 0.25 * tokens[0] + 0.35)
            label = f"{name} {sel.k}/{sel.n}" + (" (fewest)" if note else "")
            line.append((label, to_pil(unpatchify(dim[None], grid, patch)[0])))
        panels.append(line)
    _save_grid(out_dir / "kept_patches.png", to_pil(image), panels, size)
    return rows


def _save_grid(path: Path, original: Image.Image, panels: list[list[tuple[str, Image.Image]]], size: int) -> None:
    label_h, pad = 16, 4
    cols = 1 + max(len(p) for p in panels)
    canvas = Image.new("RGB", (cols * (size + pad) + pad, len(panels) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, line in enumerate(panels):
        y = pad + r * (size + label_h + pad)
        for c, (label, img) in enumerate([("original", original), *line]):
            x = pad + c * (size + pad)
            draw.text((x, y), label, fill="black")
            canvas.paste(img, (x, y + label_h))
    canvas.save(path)
