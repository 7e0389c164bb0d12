"""Reconstruction grids: originals beside their reconstructions from the first k = 1, 2, 4, …, K tokens."""

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


def demo_committed(out_dir: str | Path, n_images: int = 6) -> list[Path]:
    """A grid on held-out photos for every committed checkpoint; returns the PNGs written (none if none exist)."""
    from vtok.tokenizers_img.data import heldout_images
    from vtok.tokenizers_img.hub import available_tokenizers, load_tokenizer

    written = []
    for name in available_tokenizers():
        tok = load_tokenizer(name)
        with torch.no_grad():
            images, _ = heldout_images(tok.config.image_size, ("skimage",), limit=n_images)
        written.append(reconstruction_grid(tok, images, Path(out_dir) / f"tokenizer_{name}.png"))
    return written
