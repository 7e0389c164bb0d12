"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (70k labelled 28×28 images, offline)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_DIR = Path(os.environ.get("VTOK_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.2860, 0.3530


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """``(images uint8 [n, 28, 28], labels int64 [n])`` for ``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else DEFAULT_DIR
    prefix = "train" if split == "train" else "t10k"
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found under {root}; install the Debian package "
                                "dataset-fashion-mnist (make does) or set VTOK_FASHION_MNIST")
    return torch.from_numpy(_read_idx(img).copy()), torch.from_numpy(_read_idx(lab).astype(np.int64))


def preprocess(images: Tensor, size: int = 56) -> Tensor:
    """uint8 ``[n, 28, 28]`` → normalised float ``[n, 1, size, size]`` (bilinear upsampling)."""
    x = images.float().div_(255.0).unsqueeze(1)
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD
