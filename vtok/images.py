"""Small image helpers: bundled sample photos and patch tokens ↔ images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "grace_hopper")


def _load_photo(name: str) -> Image.Image:
    if name == "grace_hopper":  # matplotlib's sample photo
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def sample_photo(name: str = "astronaut", size: int = 224) -> Tensor:
    """A real photo shipped with scikit-image (or matplotlib's ``grace_hopper``), centre-cropped and resized to
    ``size``×``size``: float ``[3, size, size]`` in [0, 1]."""
    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"name must be one of {SAMPLE_PHOTOS}, got {name!r}")
    img = _load_photo(name)
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def patchify(images: Tensor, patch: int) -> Tensor:
    """``images [B, C, H, W]`` → patch tokens ``[B, (H/p)*(W/p), C*p*p]`` in row-major grid order."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size ({h}, {w}) must be divisible by patch={patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, grid: tuple[int, int], patch: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, h*w, C*p*p]`` → ``[B, C, h*p, w*p]``."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h, w, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * patch, w * patch)


def to_pil(image: Tensor) -> Image.Image:
    """``[3, H, W]`` float in [0, 1] → PIL image."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB between images in [0, 1]."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))
