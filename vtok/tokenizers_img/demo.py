"""Reconstruction grids: originals beside their reconstructions from the first k = 1, 2, 4, …, K tokens, and the
same photos at a fixed k beside ``adaptive_length`` at the same mean k, each cell's k written under it."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vtok.images import to_pil
from vtok.tokenizers_img.length import pow2_lengths
from vtok.tokenizers_img.tokenizer import Tokenizer


def reconstruction_grid(tok: Tokenizer, images: Tensor, path: str | Path, *, cell: int = 96,
                        ks: list[int] | None = None) -> Path:
    """Write a PNG: one row per image ``[B, 3, H, W]``, columns original, k = 1, 2, 4, …, K (upscaled to ``cell``)."""
    ks = ks or pow2_lengths(tok.num_tokens)
    recons = [tok.reconstruct(images, k).cpu() for k in ks]
    label_h, pad = 14, 3
    cols = 1 + len(ks)
    canvas = Image.new("RGB", (pad + cols * (cell + pad), label_h + pad + len(images) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(["original", *(f"k={k}" for k in ks)]):
        draw.text((pad + c * (cell + pad), 1), label, fill="black")
    for r in range(len(images)):
        row = [images[r].cpu(), *(rec[r] for rec in recons)]
        for c, img in enumerate(row):
            pil = to_pil(img.float()).resize((cell, cell), Image.NEAREST)
            canvas.paste(pil, (pad + c * (cell + pad), label_h + pad + r * (cell + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def adaptive_grid(tok: Tokenizer, images: Tensor, path: str | Path, *, cell: int = 96,
                  ks: tuple[int, ...] = (4, 8)) -> Path:
    """Write a PNG: one row per image ``[B, 3, H, W]``; per mean budget ``k`` two columns, the fixed prefix of ``k``
    tokens and ``adaptive_length`` with the same mean ``k`` over the rows; under each cell its token count and
    PSNR."""
    from vtok.images import psnr

    label_h, under, pad = 14, 12, 3
    columns: list[tuple[str, Tensor, list[int]]] = [("original", images.cpu(), [])]
    for k in ks:
        columns.append((f"prefix k={k}", tok.reconstruct(images, k).cpu(), [k] * len(images)))
        ts = tok.tokenize(images, keep=k, method="adaptive_length")
        columns.append((f"adaptive, mean {k}", tok.detokenize(ts).cpu(), ts.lengths.tolist()))
    row_h = cell + under + pad
    canvas = Image.new("RGB", (pad + len(columns) * (cell + pad), label_h + pad + len(images) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (title, recs, counts) in enumerate(columns):
        x = pad + c * (cell + pad)
        draw.text((x, 1), title, fill="black")
        for r in range(len(images)):
            y = label_h + pad + r * row_h
            canvas.paste(to_pil(recs[r].float()).resize((cell, cell), Image.NEAREST), (x, y))
            if counts:
                draw.text((x, y + cell), f"k={counts[r]}  {psnr(recs[r], images[r].cpu()):.1f} dB", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def demo_committed(out_dir: str | Path, n_images: int = 6) -> list[Path]:
    """A grid on held-out photos for every committed checkpoint, and for each nested one the fixed-k vs adaptive
    length grid (``tokenizer_<name>_adaptive.png``); returns the PNGs written (none if none exist)."""
    from vtok.tokenizers_img.data import heldout_images
    from vtok.tokenizers_img.hub import available_tokenizers, load_tokenizer

    written = []
    for name in available_tokenizers():
        tok = load_tokenizer(name)
        with torch.no_grad():
            images, _ = heldout_images(tok.config.image_size, ("skimage",), limit=n_images)
        written.append(reconstruction_grid(tok, images, Path(out_dir) / f"tokenizer_{name}.png"))
        if name.endswith("_nested"):
            with torch.no_grad():
                varied, _ = heldout_images(tok.config.image_size, ("skimage", "opencv"), limit=48)
            pick = varied[torch.linspace(0, len(varied) - 1, 8).round().long()]
            written.append(adaptive_grid(tok, pick, Path(out_dir) / f"tokenizer_{name}_adaptive.png"))
    return written
